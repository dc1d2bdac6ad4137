"""quantkit: post-training quantization and compression for Hugging Face causal LMs."""

__version__ = "0.1.0"
