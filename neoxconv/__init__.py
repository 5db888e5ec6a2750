"""neoxconv: merge tensor-parallel GPT-NeoX checkpoints into one Hugging Face model, and verify it."""

__version__ = "0.1.0"
