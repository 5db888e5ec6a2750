"""Checks of a written folder: integrity, the simulated tensor-parallel forward."""
