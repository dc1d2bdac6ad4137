"""Triton kernels and their pure-torch references."""
