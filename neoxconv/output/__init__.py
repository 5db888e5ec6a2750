"""Writing outputs: the output-folder protocol, safetensors and .pt writers, merge/split/reshard jobs."""
