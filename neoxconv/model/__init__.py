"""The model's runtime pieces: KV cache, generation, int8 swap."""
