"""The model room (ARCHITECTURE §2, §4.3): family adapters and routing, splitting, the sub-model, layer streaming,
tensor files, the base model, conversion and export. Imports torch and transformers."""
