"""W8A16: ``y = x @ dequant(W)^T`` with uint8 codes dequantized inside the kernel.

Weights are in :class:`~quantkit.kernels.layout.Int8Weight` layout (codes ``[K, N]``,
per-group scales/zeros ``[G, N]``, optional act-order ``g_idx``).  It runs the weight-only GEMM
W4A16 runs (:func:`~quantkit.kernels.tiles.weight_only_gemm_kernel`, ``BITS=8``) with its own
autotune configs, which include 16-row tiles so decode (M = 1) does not waste a 64-row tile.
"""

from __future__ import annotations

import torch
import triton
from quantkit.core.quant import symmetric_zero
from quantkit.kernels.layout import Int8Weight
from quantkit.kernels.tiles import INTERPRET_GEMM_CONFIG, configs, gemm_grid, launch, weight_only_gemm_kernel
from quantkit.kernels.triton_utils import dot_in_fp32


_w8a16_tuned = triton.autotune(configs([
    (16, 64, 128, 8, 4, 4), (16, 128, 128, 8, 4, 3), (16, 256, 64, 8, 8, 3), (32, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 3), (128, 64, 64, 8, 4, 3), (128, 128, 64, 8, 8, 3), (128, 256, 32, 8, 8, 3),
]), key=["M", "N", "K", "HAS_GIDX"])(weight_only_gemm_kernel)


def w8a16_matmul(x: torch.Tensor, w: Int8Weight, config: dict | None = None) -> torch.Tensor:
    """``x [..., K] @ dequant(w)^T -> [..., N]`` in ``x.dtype`` (``config``: fixed block sizes)."""
    K, N = w.in_features, w.out_features
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {K}")
    if w.qweight.dtype != torch.uint8:
        raise ValueError(f"qweight must be uint8 [K, N], got {w.qweight.dtype}")
    if w.zeros is not None and w.zeros.stride() != w.scales.stride():
        raise ValueError("zeros and scales must share a layout ([G, N], contiguous)")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    z = w.zeros if w.zeros is not None else w.scales  # dummy pointer when symmetric
    g = w.g_idx if w.g_idx is not None else w.qweight
    args = (x2, w.qweight, w.scales, z, g, y, M, N, K, w.group_size, x2.stride(0), x2.stride(1),
            w.qweight.stride(0), w.qweight.stride(1), w.scales.stride(0), w.scales.stride(1), y.stride(0), y.stride(1))
    flags = dict(BITS=8, HAS_ZEROS=w.zeros is not None, SYM_ZERO=symmetric_zero(8), HAS_GIDX=w.g_idx is not None,
                 DOT_FP32=dot_in_fp32(x2.dtype))
    launch(weight_only_gemm_kernel, _w8a16_tuned, gemm_grid(M, N), args, flags, config, INTERPRET_GEMM_CONFIG)
    return y.reshape(*x.shape[:-1], N)
