"""Reading sources: torch archives, DeepSpeed checkpoints, storages, checksums, tokenizer files."""
