"""What the Triton GEMM kernels share (imported only by the kernels themselves, so CPU-only code
paths never import Triton): the ``@triton.jit`` tile skeleton -- grouped tile order, the masked
activation load, the group-wise dequantization, the accumulate and the masked store -- the
weight-only GEMM that W4A16 and W8A16 run (``BITS`` picks the code layout), and, on
the host, the autotune config lists and the one launcher that picks the tuned kernel on a GPU
or a fixed small config in the interpreter."""

import triton
import triton.language as tl

from quantkit.kernels.triton_utils import interpreting


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in grouped order: GROUP_M row tiles sweep the
    columns together so their weight tiles are reused from L2 (Triton's matmul tutorial)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_m
    pid_n = (pid % num_pid_in_group) // group_m
    return pid_m, pid_n


@triton.jit
def load_rows(ptr, offs_m, offs_k, M, K, stride_m, stride_k, other):
    """The ``[BM, BK]`` tile ``ptr[offs_m, offs_k]``, ``other`` outside ``M x K``."""
    return tl.load(ptr + offs_m[:, None] * stride_m + offs_k[None, :] * stride_k,
                   mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=other)


@triton.jit
def dequant_tile(q, offs_k, offs_n, N, K, group_size, s_ptr, z_ptr, g_ptr, stride_sg, stride_sn,
                 HAS_ZEROS: tl.constexpr, SYM_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr):
    """``(q - z[g(k), n]) * s[g(k), n]`` in float32 for int32 codes ``q [BK, BN]``: the group of
    input column k is ``g_idx[k]`` with act-order, else ``k // group_size``; without stored zero
    points the zero is the symmetric grid's ``SYM_ZERO``."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
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
def dot_acc(acc, x, w, DOT_FP32: tl.constexpr):
    """``acc + x @ w`` for a float32 weight tile: in float32 (the interpreter, float32
    activations), else on tensor cores in the activations' dtype."""
    if DOT_FP32:  # IEEE float32 (Triton's default for a float32 dot is TF32 on a GPU)
        acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
    else:
        acc += tl.dot(x, w.to(x.dtype))
    return acc


@triton.jit
def store_tile(y_ptr, y, offs_m, offs_n, M, N, stride_ym, stride_yn):
    """Store the ``[BM, BN]`` tile ``y`` in ``y_ptr``'s dtype, masked to ``M x N``."""
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def weight_tile(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, N, K, group_size,
                stride_wk, stride_wn, stride_sg, stride_sn,
                BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, SYM_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr):
    """The dequantized float32 weight tile ``[BK, BN]``: codes from int32 words of 8 nibbles
    along K (``BITS`` 4) or uint8 ``[K, N]`` (``BITS`` 8), then :func:`dequant_tile`."""
    if BITS == 4:
        words = load_rows(w_ptr, offs_k // 8, offs_n, (K + 7) // 8, N, stride_wk, stride_wn, 0)
        q = (words >> ((offs_k[:, None] % 8) * 4)) & 0xF  # [BK, BN] int32 codes
    else:
        q = load_rows(w_ptr, offs_k, offs_n, K, N, stride_wk, stride_wn, 0).to(tl.int32)
    return dequant_tile(q, offs_k, offs_n, N, K, group_size, s_ptr, z_ptr, g_ptr, stride_sg, stride_sn,
                        HAS_ZEROS, SYM_ZERO, HAS_GIDX)


@triton.jit
def weight_only_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, y_ptr,
    M, N, K, group_size,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_sg, stride_sn, stride_ym, stride_yn,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, SYM_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``y = x @ dequant(W)^T`` in M-by-N output tiles with a loop over K (W4A16 and W8A16)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)  # L2-friendly order
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_rows(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, 0.0)  # [BM, BK]
        w = weight_tile(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, N, K, group_size, stride_wk, stride_wn,
                        stride_sg, stride_sn, BITS, HAS_ZEROS, SYM_ZERO, HAS_GIDX)  # [BK, BN]
        acc = dot_acc(acc, x, w, DOT_FP32)
    store_tile(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, stride_yn)


# ---- host side ------------------------------------------------------------------------------
GEMM_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
INTERPRET_GEMM_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def configs(rows, keys=GEMM_KEYS, **fixed) -> list:
    """``triton.Config``s from rows ``(*block sizes in keys' order, num_warps, num_stages)``."""
    return [triton.Config(dict(zip(keys, r[:len(keys)]), **fixed), num_warps=r[-2], num_stages=r[-1]) for r in rows]


def launch(kernel, tuned, grid, args, flags: dict, config: dict | None, fallback: dict) -> None:
    """Run ``tuned`` (the autotuned ``kernel``) on a GPU, or ``kernel`` with ``config`` (given) or
    ``fallback`` (in the interpreter); ``grid(meta)`` is the launch grid for block sizes ``meta``."""
    if config is None and not interpreting():
        tuned[grid](*args, **flags)
    else:
        cfg = config or fallback
        kernel[grid(cfg)](*args, **flags, **cfg)


def gemm_grid(M: int, N: int):
    """The 1-D grid of an ``M x N`` output in ``BLOCK_M x BLOCK_N`` tiles."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
