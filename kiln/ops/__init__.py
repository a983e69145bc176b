"""Attention ops: metadata, torch references, Triton kernels and the ``kiln::attention`` custom op."""
