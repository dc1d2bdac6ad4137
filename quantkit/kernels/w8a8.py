"""W8A8: ``y = (x_int8 @ w_int8^T) * x_scale[m] * w_scale[n] (+ bias)``, int32 accumulation.

``x_int8 [M, K]`` carries one scale per token (dynamic, per-row), ``w_int8 [N, K]`` one per
output channel (SmoothQuant's W8A8).  The int8 x int8 -> int32 ``tl.dot`` runs on tensor cores;
the epilogue applies both scales in float32.  The weight is read through its strides as
``[K, N]`` tiles, so the checkpoint's ``[N, K]`` needs no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from quantkit.kernels.tiles import grouped_tile
from quantkit.kernels.triton_utils import interpreting

INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


@triton.jit
def _w8a8_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)  # L2-friendly order

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)  # [BM, BK] int8
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0)  # [BK, BN] int8
        acc += tl.dot(x, w, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)
    ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _configs():
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=nw, num_stages=ns)
        for bm, bn, bk, nw, ns in [
            (16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 128, 4, 3),
            (128, 64, 128, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
        ]
    ]


_w8a8_tuned = triton.autotune(_configs(), key=["M", "N", "K", "HAS_BIAS"])(_w8a8_kernel)


def w8a8_matmul(x_int8: torch.Tensor, w_int8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.bfloat16, bias: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """``x_int8 [M, K]``, ``w_int8 [N, K]``, ``x_scale [M]``, ``w_scale [N]`` -> ``[M, N]`` in ``out_dtype``."""
    if x_int8.dtype != torch.int8 or w_int8.dtype != torch.int8:
        raise ValueError(f"x and w must be int8, got {x_int8.dtype} and {w_int8.dtype}")
    if x_int8.dim() != 2 or w_int8.dim() != 2 or x_int8.shape[1] != w_int8.shape[1]:
        raise ValueError(f"want x [M, K] and w [N, K], got {tuple(x_int8.shape)} and {tuple(w_int8.shape)}")
    M, K = x_int8.shape
    N = w_int8.shape[0]
    x_scale, w_scale = x_scale.reshape(-1), w_scale.reshape(-1)
    if x_scale.numel() != M or w_scale.numel() != N:
        raise ValueError(f"want x_scale [{M}] and w_scale [{N}], got {x_scale.numel()} and {w_scale.numel()}")
    y = torch.empty(M, N, device=x_int8.device, dtype=out_dtype)
    args = (x_int8, w_int8, x_scale, w_scale, bias if bias is not None else w_scale, y, M, N, K,
            x_int8.stride(0), x_int8.stride(1), w_int8.stride(0), w_int8.stride(1), y.stride(0), y.stride(1))
    if config is None and not interpreting():
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _w8a8_tuned[grid](*args, HAS_BIAS=bias is not None)
    else:
        cfg = config or INTERPRET_CONFIG
        _w8a8_kernel[(triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)](*args, HAS_BIAS=bias is not None, **cfg)
    return y
