"""W4A16: ``y = x @ dequant(W)^T`` with int4 weights dequantized inside the kernel.

Two kernels share one tile loader (:func:`_load_int4_tile`):

* ``_w4a16_gemm_kernel``: M-by-N output tiles, a loop over K (prefill, M > 16);
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
from quantkit.kernels.tiles import grouped_tile
from quantkit.kernels.triton_utils import dot_in_fp32, interpreting

DECODE_MAX_M = 16
INTERPRET_GEMM_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
INTERPRET_SPLITK_CONFIG = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2)


@triton.jit
def _load_int4_tile(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, N, K, group_size,
                    stride_wk, stride_wn, stride_sg, stride_sn,
                    HAS_ZEROS: tl.constexpr, SYM_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr):
    """Dequantized float32 weight tile ``[BLOCK_K, BLOCK_N]``: ``(q - z[g(k), n]) * s[g(k), n]``."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    words = tl.load(w_ptr + (offs_k[:, None] // 8) * stride_wk + offs_n[None, :] * stride_wn, mask=mask, other=0)
    q = (words >> ((offs_k[:, None] % 8) * 4)) & 0xF  # [BK, BN] int32 codes
    if HAS_GIDX:
        g = tl.load(g_ptr + offs_k, mask=offs_k < K, other=0)  # act-order column -> group
    else:
        g = offs_k // group_size
    sg_off = g[:, None] * stride_sg + offs_n[None, :] * stride_sn
    s = tl.load(s_ptr + sg_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + sg_off, mask=mask, other=0).to(tl.int32)
    else:
        z = SYM_ZERO
    return (q - z).to(tl.float32) * s


@triton.jit
def _w4a16_gemm_kernel(
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
        w = _load_int4_tile(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, N, K, group_size,
                            stride_wk, stride_wn, stride_sg, stride_sn, HAS_ZEROS, SYM_ZERO, HAS_GIDX)  # [BK, BN]
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w)
        else:
            acc += tl.dot(x, w.to(x.dtype))
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


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
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)  # [16, BK]
        w = _load_int4_tile(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, N, K, group_size,
                            stride_wk, stride_wn, stride_sg, stride_sn, HAS_ZEROS, SYM_ZERO, HAS_GIDX)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w)
        else:
            acc += tl.dot(x, w.to(x.dtype))
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.atomic_add(y_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _gemm_configs():
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=nw, num_stages=ns)
        for bm, bn, bk, nw, ns in [
            (32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
            (128, 128, 64, 8, 3), (128, 256, 32, 8, 3), (64, 256, 32, 4, 4), (32, 128, 128, 4, 3),
        ]
    ]


def _splitk_configs():
    return [
        triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk), num_warps=nw, num_stages=ns)
        for bn, bk, sk, nw, ns in [
            (64, 64, 1, 4, 3), (64, 128, 2, 4, 3), (128, 64, 2, 4, 3), (128, 128, 4, 4, 3),
            (64, 64, 4, 4, 4), (128, 128, 8, 8, 3), (256, 64, 4, 8, 3), (64, 256, 8, 4, 2),
        ]
    ]


_w4a16_gemm_tuned = triton.autotune(_gemm_configs(), key=["M", "N", "K", "HAS_GIDX"])(_w4a16_gemm_kernel)
_w4a16_splitk_tuned = triton.autotune(_splitk_configs(), key=["N", "K", "HAS_GIDX"], reset_to_zero=["y_ptr"])(
    _w4a16_splitk_kernel)


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
    tuned = config is None and not interpreting()
    if decode:
        if tuned:
            _w4a16_splitk_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])](*args, **flags)
        else:
            cfg = config or INTERPRET_SPLITK_CONFIG
            _w4a16_splitk_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])](*args, **flags, **cfg)
        y = y.to(x.dtype)
    elif tuned:
        _w4a16_gemm_tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
    else:
        cfg = config or INTERPRET_GEMM_CONFIG
        _w4a16_gemm_kernel[(triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)](*args, **flags, **cfg)
    return y.reshape(*x.shape[:-1], N)
