"""W8A16: ``y = x @ dequant(W)^T`` with uint8 codes dequantized inside the kernel.

Weights are in :class:`~quantkit.kernels.layout.Int8Weight` layout (codes ``[K, N]``,
per-group scales/zeros ``[G, N]``, optional act-order ``g_idx``).  One tiled GEMM; its
autotune configs include 16-row tiles so decode (M = 1) does not waste a 64-row tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from quantkit.core.quant import symmetric_zero
from quantkit.kernels.layout import Int8Weight
from quantkit.kernels.tiles import grouped_tile
from quantkit.kernels.triton_utils import dot_in_fp32, interpreting

INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, y_ptr,
    M, N, K, group_size,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_sg, stride_sn, stride_ym, stride_yn,
    HAS_ZEROS: tl.constexpr, SYM_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)  # L2-friendly order

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)  # [BM, BK]
        mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        q = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=mask, other=0).to(tl.int32)
        if HAS_GIDX:
            g = tl.load(g_ptr + offs_k, mask=offs_k < K, other=0)
        else:
            g = offs_k // group_size
        sg_off = g[:, None] * stride_sg + offs_n[None, :] * stride_sn
        s = tl.load(s_ptr + sg_off, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + sg_off, mask=mask, other=0).to(tl.int32)
        else:
            z = SYM_ZERO
        w = (q - z).to(tl.float32) * s  # [BK, BN]
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w)
        else:
            acc += tl.dot(x, w.to(x.dtype))
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _configs():
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=nw, num_stages=ns)
        for bm, bn, bk, nw, ns in [
            (16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (16, 256, 64, 8, 3), (32, 64, 64, 4, 4),
            (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 32, 8, 3),
        ]
    ]


_w8a16_tuned = triton.autotune(_configs(), key=["M", "N", "K", "HAS_GIDX"])(_w8a16_kernel)


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
    flags = dict(HAS_ZEROS=w.zeros is not None, SYM_ZERO=symmetric_zero(8), HAS_GIDX=w.g_idx is not None,
                 DOT_FP32=dot_in_fp32(x2.dtype))
    if config is None and not interpreting():
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _w8a16_tuned[grid](*args, **flags)
    else:
        cfg = config or INTERPRET_CONFIG
        _w8a16_kernel[(triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)](*args, **flags, **cfg)
    return y.reshape(*x.shape[:-1], N)
