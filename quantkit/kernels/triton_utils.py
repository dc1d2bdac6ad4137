"""Small helpers shared by the Triton launchers."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Cast ``tl.dot`` operands to float32? Always in the interpreter (its bf16 dot is wrong), and
    for float32 activations; half-precision activations on a GPU use the tensor-core dot."""
    return interpreting() or dtype == torch.float32
