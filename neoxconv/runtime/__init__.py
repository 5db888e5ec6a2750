"""Loading a merged folder onto devices: resident or placed (accelerate)."""
