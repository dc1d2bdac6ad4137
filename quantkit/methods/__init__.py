"""Compression methods: one file each, each registering itself with :mod:`quantkit.registry`."""

from quantkit.methods import gptq, rtn  # noqa: F401
