"""The ground role: MoE family adapters and splitting, data, affinity profiling, trainer, uplink (ARCHITECTURE §2)."""
