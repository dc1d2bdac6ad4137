"""Pure-torch oracles, one per kernel, with the kernels' signatures.

Each dequantizes with the one :func:`quantkit.core.quant.dequantize` and multiplies in
float32; every Triton kernel and CPU fast path is tested against these.

    >>> from quantkit.kernels.layout import int4_weight_from_codes
    >>> q = torch.randint(0, 16, (5, 40), dtype=torch.uint8)
    >>> w = int4_weight_from_codes(q, torch.rand(5, 5), None, None, group_size=8)
    >>> w4a16_matmul_ref(torch.randn(3, 40), w).shape
    torch.Size([3, 5])
"""

from __future__ import annotations

import torch

from quantkit.kernels.layout import Int4Weight, Int8Weight, group_map, unpack_int4_weight
from quantkit.core.quant import dequantize, symmetric_zero


def _dequant(q: torch.Tensor, scales, zeros, g_idx, group_size: int, bits: int) -> torch.Tensor:
    """Codes ``[N, K]`` with kernel-layout ``scales``/``zeros [G, N]`` -> float32 weight ``[N, K]``."""
    z = zeros.t().float() if zeros is not None else torch.full_like(scales.t(), symmetric_zero(bits), dtype=torch.float32)
    return dequantize(q, scales.t().float(), z, group_map(g_idx, group_size, q.shape[1], q.device))


def w4a16_matmul_ref(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """``x [..., K] @ W^T`` in float32 for the W4A16 layout -> float32 ``[..., N]``."""
    wd = _dequant(unpack_int4_weight(w), w.scales, w.zeros, w.g_idx, w.group_size, 4)
    return x.float() @ wd.t()


def w8a16_matmul_ref(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """``x [..., K] @ W^T`` in float32 for the W8A16 layout -> float32 ``[..., N]``."""
    wd = _dequant(w.qweight.t(), w.scales, w.zeros, w.g_idx, w.group_size, 8)
    return x.float() @ wd.t()


def int8_matmul_ref(x_int8: torch.Tensor, w_int8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                    out_dtype: torch.dtype = torch.float32, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: ``(x_int8 [M, K] @ w_int8 [N, K]^T) * x_scale [M, 1] * w_scale [1, N] (+ bias)``.

    The int32 accumulation is exact in int64 here; the scaling is float32.
    """
    acc = x_int8.to(torch.int64) @ w_int8.to(torch.int64).t()  # [M, N], exact
    y = acc.float() * x_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
