"""W4A16: ``y = x @ dequant(W)^T`` with int4 weights dequantized inside the kernel.

Two kernels share one tile loader (:func:`~quantkit.kernels.tiles.weight_tile`):

* :func:`~quantkit.kernels.tiles.weight_only_gemm_kernel` (``BITS=4``, shared with W8A16): M-by-N
  output tiles, a loop over K (prefill, M > 16);
* ``_w4a16_splitk_kernel``: decode (M <= 16): one 16-row tile, K split over ``SPLIT_K``
  programs that ``atomic_add`` float32 partial sums (more programs than N/BLOCK_N alone
  would give, so a GEMV fills the GPU).

Weights are in :class:`~quantkit.kernels.layout.Int4Weight` layout (int32 words of 8 nibbles
along K, per-group scales/zeros ``[G, N]``, optional act-order ``g_idx``).  The launcher
:func:`w4a16_matmul` checks shapes, allocates and launches; autotuning is for real GPUs, the
Triton interpreter (``TRITON_INTERPRET=1``, used by the tests on CPU) gets a fixed config.

In the interpreter ``tl.dot`` on bf16 operands is wrong, so there (and for fp32 activations)
both operands are cast to float32 before the dot (``DOT_FP32``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from quantkit.core.quant import symmetric_zero
from quantkit.kernels.layout import Int4Weight
from quantkit.kernels.tiles import (INTERPRET_GEMM_CONFIG, configs, dot_acc, gemm_grid, launch, load_rows,
                                    weight_only_gemm_kernel, weight_tile)
from quantkit.kernels.triton_utils import dot_in_fp32

DECODE_MAX_M = 16
SPLITK_KEYS = ("BLOCK_N", "BLOCK_K", "SPLIT_K")
INTERPRET_SPLITK_CONFIG = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2)


@triton.jit
def _w4a16_splitk_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, y_ptr,
    M, N, K, group_size,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_sg, stride_sn, stride_ym, stride_yn,
    HAS_ZEROS: tl.constexpr, SYM_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """``y`` (float32, zero-initialised) ``+=`` this program's share of K; M <= 16."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):  # K blocks interleaved over pid_k
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_rows(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, 0.0)  # [16, BK]
        w = weight_tile(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, N, K, group_size, stride_wk, stride_wn,
                        stride_sg, stride_sn, 4, HAS_ZEROS, SYM_ZERO, HAS_GIDX)
        acc = dot_acc(acc, x, w, DOT_FP32)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.atomic_add(y_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_w4a16_gemm_tuned = triton.autotune(configs([
    (32, 64, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 3), (128, 64, 64, 8, 4, 3),
    (128, 128, 64, 8, 8, 3), (128, 256, 32, 8, 8, 3), (64, 256, 32, 8, 4, 4), (32, 128, 128, 8, 4, 3),
]), key=["M", "N", "K", "HAS_GIDX"])(weight_only_gemm_kernel)
_w4a16_splitk_tuned = triton.autotune(configs([
    (64, 64, 1, 4, 3), (64, 128, 2, 4, 3), (128, 64, 2, 4, 3), (128, 128, 4, 4, 3),
    (64, 64, 4, 4, 4), (128, 128, 8, 8, 3), (256, 64, 4, 8, 3), (64, 256, 8, 4, 2),
], SPLITK_KEYS), key=["N", "K", "HAS_GIDX"], reset_to_zero=["y_ptr"])(_w4a16_splitk_kernel)


def w4a16_matmul(x: torch.Tensor, w: Int4Weight, config: dict | None = None) -> torch.Tensor:
    """``x [..., K] @ dequant(w)^T -> [..., N]`` in ``x.dtype``.

    ``config`` fixes the block sizes (keys of the chosen kernel: ``BLOCK_M/BLOCK_N/BLOCK_K/GROUP_M``
    for M > 16, ``BLOCK_N/BLOCK_K/SPLIT_K`` for M <= 16); by default the autotuner picks them
    on a GPU and a small fixed config is used in the interpreter.

        >>> y = w4a16_matmul(x, int4_weight_from_codes(q, scales, zeros, None, 128))  # doctest: +SKIP
    """
    K, N = w.in_features, w.out_features
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {K}")
    if w.qweight.dtype != torch.int32 or w.qweight.shape[0] != (K + 7) // 8:
        raise ValueError(f"qweight must be int32 [ceil(K/8), N], got {w.qweight.dtype} {tuple(w.qweight.shape)}")
    if w.zeros is not None and w.zeros.stride() != w.scales.stride():
        raise ValueError("zeros and scales must share a layout ([G, N], contiguous)")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    decode = M <= DECODE_MAX_M
    # decode accumulates float32 partial sums atomically, so it starts from zeros
    y = torch.zeros(M, N, device=x.device, dtype=torch.float32) if decode else torch.empty(M, N, device=x.device, dtype=x.dtype)
    z = w.zeros if w.zeros is not None else w.scales  # dummy pointer when symmetric
    g = w.g_idx if w.g_idx is not None else w.qweight  # dummy pointer without act-order
    args = (x2, w.qweight, w.scales, z, g, y, M, N, K, w.group_size, x2.stride(0), x2.stride(1),
            w.qweight.stride(0), w.qweight.stride(1), w.scales.stride(0), w.scales.stride(1), y.stride(0), y.stride(1))
    flags = dict(HAS_ZEROS=w.zeros is not None, SYM_ZERO=symmetric_zero(4), HAS_GIDX=w.g_idx is not None,
                 DOT_FP32=dot_in_fp32(x2.dtype))
    if decode:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        launch(_w4a16_splitk_kernel, _w4a16_splitk_tuned, grid, args, flags, config, INTERPRET_SPLITK_CONFIG)
        y = y.to(x.dtype)
    else:
        launch(weight_only_gemm_kernel, _w4a16_gemm_tuned, gemm_grid(M, N), args, dict(flags, BITS=4), config,
               INTERPRET_GEMM_CONFIG)
    return y.reshape(*x.shape[:-1], N)
