"""Tensor-parallel-aware building blocks; the model composes them and knows nothing of TP."""
