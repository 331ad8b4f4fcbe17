"""The learning room (ARCHITECTURE §2, §4.1, §4.4): data and tokenizers, affinity profiling, the trainer, evaluation and
the centralised reference. Imports torch."""
