"""Planning: what each output tensor is made of, source fingerprints, the plan described."""
