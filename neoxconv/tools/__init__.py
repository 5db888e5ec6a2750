"""Demo and synthetic checkpoints."""
