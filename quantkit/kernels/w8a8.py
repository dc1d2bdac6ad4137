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
from quantkit.kernels.tiles import INTERPRET_GEMM_CONFIG, configs, gemm_grid, grouped_tile, launch, load_rows, store_tile


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
        x = load_rows(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, 0)  # [BM, BK] int8
        w = load_rows(w_ptr, offs_k, offs_n, K, N, stride_wk, stride_wn, 0)  # [BK, BN] int8
        acc += tl.dot(x, w, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)
    ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    store_tile(y_ptr, y, offs_m, offs_n, M, N, stride_ym, stride_yn)


_w8a8_tuned = triton.autotune(configs([
    (16, 64, 128, 8, 4, 4), (32, 64, 128, 8, 4, 4), (64, 64, 128, 8, 4, 4), (64, 128, 128, 8, 4, 3),
    (128, 64, 128, 8, 4, 3), (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3),
]), key=["M", "N", "K", "HAS_BIAS"])(_w8a8_kernel)


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
    launch(_w8a8_kernel, _w8a8_tuned, gemm_grid(M, N), args, dict(HAS_BIAS=bias is not None), config,
           INTERPRET_GEMM_CONFIG)
    return y
