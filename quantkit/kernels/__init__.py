"""Kernels for packed weights: Triton (GPU, and its interpreter in tests), quantkit's native CPU
kernels (C sources in ``kernels/``, built on first use by :mod:`~quantkit.kernels.native`),
PyTorch's CPU low-bit ops, and a pure-torch reference for each.

Which one runs is decided in one place, :mod:`quantkit.runtime.backends`; nothing here looks
at the device.  Triton modules (``w4a16``, ``w8a16``, ``w8a8``) are imported only when used,
so CPU-only installs without Triton work.

    >>> y = int8_matmul(x_int8, w_int8, x_scale, w_scale, backend="cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from quantkit.kernels.cpu import int8_matmul_cpu
from quantkit.kernels.layout import (
    Int4Weight,
    Int8Weight,
    int4_weight_from_codes,
    int4_weight_from_packed,
    int8_weight_from_codes,
    unpack_int4_weight,
)
from quantkit.kernels.reference import int8_matmul_ref, w4a16_matmul_ref, w8a16_matmul_ref

__all__ = [
    "Int4Weight", "Int8Weight", "int4_weight_from_codes", "int4_weight_from_packed", "int8_weight_from_codes",
    "unpack_int4_weight", "int8_matmul", "int8_matmul_ref", "w4a16_matmul_ref", "w8a16_matmul_ref",
]

INT8_MATMUL_BACKENDS = ("triton", "cpu", "reference")


def int8_matmul(x_int8: torch.Tensor, w_int8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.bfloat16, bias: torch.Tensor | None = None, *,
                backend: str) -> torch.Tensor:
    """W8A8 ``x_int8 [M, K] @ w_int8 [N, K]^T * x_scale [M, 1] * w_scale [1, N] (+ bias)`` -> ``[M, N]``.

    ``backend`` is one of ``triton`` (Triton kernel), ``cpu`` (``torch._int_mm``) or
    ``reference``; the runtime's :func:`quantkit.runtime.backends.int8_matmul` picks it.
    """
    if backend == "triton":
        from quantkit.kernels.w8a8 import w8a8_matmul

        return w8a8_matmul(x_int8, w_int8, x_scale, w_scale, out_dtype, bias)
    if backend == "cpu":
        return int8_matmul_cpu(x_int8, w_int8, x_scale, w_scale, out_dtype, bias)
    if backend == "reference":
        return int8_matmul_ref(x_int8, w_int8, x_scale, w_scale, out_dtype, bias)
    raise ValueError(f"unknown int8_matmul backend {backend!r}; use one of {', '.join(INT8_MATMUL_BACKENDS)}")
