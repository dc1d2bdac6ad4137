"""CPU fast paths, fed layouts converted once at load.

* int4 (any format with <= 4 bits), first choice: quantkit's own kernel
  (:mod:`quantkit.kernels.native`, built on first use for AVX-512 BF16, else AVX2 + FMA + F16C):
  activations rounded to bf16 and float32 sums, float32 or bf16 activations in and out with no
  cast ops, the bias added inside, 1.6-3x the speed of PyTorch's op.  Float32 activations of a sequence of at least
  ``FP32_EXACT_MIN_TOKENS`` positions (prefill, perplexity) are instead multiplied in float32
  against the weight dequantized exactly, in chunks of rows: the reference's numbers, at
  float32 GEMM speed.
* int4 where that kernel cannot run (neither instruction set, no C compiler, ``QUANTKIT_NATIVE=0``):
  ``_convert_weight_to_int4pack_for_cpu`` + ``_weight_int4pack_mm_for_cpu``.  The op
  dequantizes ``(q - 8) * scale + zero``; our grid is ``(q - z) * s``, so ``zero = (8 - z) * s``
  (exact for 2/3-bit codes too, stored as nibbles).  Limits handled here: group sizes
  32/64/128/256 (a larger multiple, e.g. per-channel, is split into equal-scale groups), N a
  multiple of 16 (rows are padded).  Both int4 paths take act-order: the columns are sorted by
  group at load and the activations gathered the same way per call.
* int8 weight-only, per-channel (5-8 bits): ``_weight_int8pack_mm`` on ``q - 2**(bits-1)``
  (int8), plus ``- sum(x) * (z - 2**(bits-1)) * s`` for asymmetric grids.  Its bf16 kernel
  reads past the end when K is not a multiple of 16 (NaNs, torch 2.13), so K is zero-padded.
* W8A8: ``torch._int_mm`` (int32 accumulation) then the per-token x per-channel scales.
* Anything else (group-wise 5-8 bit, odd group sizes): the weight dequantized once to bf16.

PyTorch's ops are fast with bf16 activations and very slow with float32, so those paths run in
bf16: float32 ``x`` is cast to bf16 and the output cast back to ``x.dtype``.  The bf16 scales
(rounded from fp16) add a relative error of about 2**-9 per weight, well under the quantization
noise; the tests bound the output error at 1e-2 relative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantkit.kernels.native import int4 as native_int4
from quantkit.kernels.native.int4 import NativeInt4Weight
from quantkit.kernels.layout import group_map
from quantkit.core.quant import dequantize

CPU_INT4_GROUP_SIZES = (256, 128, 64, 32)
COMPUTE_DTYPE = torch.bfloat16
# Float32 activations ``[..., S, K]`` with at least this many positions S (prefill, perplexity
# windows) go through the exactly dequantized weight and a float32 GEMM instead of the bf16
# kernel: the reference's numbers, and over many rows the dequantization is paid back.  Decode
# feeds S = 1 whatever the batch, so a sequence decodes the same alone or batched with others.
FP32_EXACT_MIN_TOKENS = 16
# Rows of the float32 weight dequantized at a time on that path (a bounded temporary: 16 MiB).
DEQUANT_CHUNK_ELEMENTS = 4 * 2**20


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _to_compute(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(-1, k).to(COMPUTE_DTYPE).contiguous()


# ---- int4 -------------------------------------------------------------------------------
@dataclass
class CpuInt4Weight:
    """PyTorch's int4 op layout (used where the native kernel cannot run)."""

    packed: torch.Tensor  # uint8 [N_pad, K/2], PyTorch's opaque CPU int4 layout
    scale_zeros: torch.Tensor  # bf16 [K/group, N_pad, 2]: (scale, (8 - z) * scale)
    group_size: int  # the op's group size (divides the checkpoint's)
    out_features: int
    perm: torch.Tensor | None  # int64 [K]: act-order column order (x is gathered by it)

    def nbytes(self) -> int:
        return _nbytes(self.packed, self.scale_zeros, self.perm)


def _act_order(q: torch.Tensor, g_idx: torch.Tensor | None, group_size: int):
    """``(q with columns sorted by group, perm or None)``, or ``None`` when act-order groups do
    not each keep ``group_size`` columns (then no int4 path can take the format)."""
    if g_idx is None:
        return q, None
    k = q.shape[1]
    default = group_map(None, group_size, k, g_idx.device).long()
    if torch.equal(g_idx.long(), default):
        return q, None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], default):
        return None
    return q[:, perm], perm


def cpu_int4_weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
                    group_size: int, native: bool = True) -> NativeInt4Weight | CpuInt4Weight | None:
    """Codes ``q [N, K]`` (< 16), ``scales``/``zeros [N, G]`` (float) -> the native kernel's
    layout if it can run here (and ``native``), else PyTorch's op layout, or None if neither
    can express this format."""
    n, k = q.shape
    if q.numel() and int(q.max()) > 15:
        return None
    sorted_ = _act_order(q, g_idx, group_size)
    if sorted_ is None:
        return None
    q, perm = sorted_
    if native:
        w = native_int4.int4_weight(q, scales, zeros, perm, group_size)
        if w is not None:
            return w
    op_group = next((g for g in CPU_INT4_GROUP_SIZES if group_size % g == 0 and k % g == 0), None)
    if op_group is None:
        return None
    rep = group_size // op_group
    s = scales.float().repeat_interleave(rep, dim=1)  # [N, K/op_group]
    z = zeros.float().repeat_interleave(rep, dim=1)
    pad = (-n) % 16  # the op wants N % 16 == 0: pad rows with zero scales (outputs 0, sliced off)
    sz = F.pad(torch.stack([s, (8 - z) * s], dim=-1), (0, 0, 0, 0, 0, pad))  # [N_pad, G', 2]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(F.pad(q.to(torch.int32), (0, 0, 0, pad)), 2)
    return CpuInt4Weight(packed, sz.transpose(0, 1).contiguous().to(COMPUTE_DTYPE), op_group, n, perm)


def exact_float32(x: torch.Tensor) -> bool:
    """Whether ``x [..., S, K]`` is float32 prefill (``S >= FP32_EXACT_MIN_TOKENS``), computed exactly."""
    return x.dtype == torch.float32 and x.dim() >= 2 and x.shape[-2] >= FP32_EXACT_MIN_TOKENS


def cpu_int4_matmul(x: torch.Tensor, w: NativeInt4Weight | CpuInt4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` in ``x.dtype`` (+ ``bias``).  Called per linear per token in
    decode, so it does no work it can skip."""
    if isinstance(w, NativeInt4Weight):
        if exact_float32(x):
            return _int4_exact_fp32(x, w, bias)
        if x.dtype in (torch.float32, torch.bfloat16):
            b = None if bias is None else bias.float().contiguous()  # a no-op for float32 biases
            return native_int4.int4_matmul(x, w, b)
        y = native_int4.int4_matmul(x.to(COMPUTE_DTYPE), w, None if bias is None else bias.float())
        return y.to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != COMPUTE_DTYPE:
        x2 = x2.to(COMPUTE_DTYPE)
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), w.packed, w.group_size, w.scale_zeros)
    if y.shape[1] != w.out_features:
        y = y[:, : w.out_features]
    y = y.reshape(*x.shape[:-1], w.out_features)
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def _int4_exact_fp32(x: torch.Tensor, w: NativeInt4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """Float32 GEMM against the exactly dequantized weight, ``DEQUANT_CHUNK_ELEMENTS`` at a time."""
    x2 = x.reshape(-1, w.in_features)
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)  # the layout's columns are in perm order
    n = w.out_features
    rows = max(16, DEQUANT_CHUNK_ELEMENTS // w.in_features // 16 * 16)
    if rows >= n:
        y = F.linear(x2, native_int4.dequantize_rows(w, 0, n, torch.float32), None if bias is None else bias.float())
    else:
        y = torch.empty(x2.shape[0], n, dtype=torch.float32)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            y[:, start:stop] = x2 @ native_int4.dequantize_rows(w, start, stop, torch.float32).t()
        if bias is not None:
            y += bias.float()
    return y.reshape(*x.shape[:-1], n)


# ---- int8 weight-only ---------------------------------------------------------------------
@dataclass
class CpuInt8Weight:
    qweight: torch.Tensor  # int8 [N, K_pad] = q - 2**(bits-1)
    scales: torch.Tensor  # bf16 [N]
    zero_term: torch.Tensor | None  # float32 [N]: (z - 2**(bits-1)) * s; None when symmetric
    in_features: int

    def nbytes(self) -> int:
        return _nbytes(self.qweight, self.scales, self.zero_term)


def cpu_int8_weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> CpuInt8Weight | None:
    """Per-channel codes ``q [N, K]``, ``scales``/``zeros [N, 1]`` -> int8 layout, or None when
    the grid is group-wise (the op has one scale per output channel)."""
    if scales.shape[1] != 1 or bits > 8:
        return None
    n, k = q.shape
    offset = 2 ** (bits - 1)
    w8 = F.pad((q.to(torch.int16) - offset).to(torch.int8), (0, (-k) % 16))
    s = scales.float().reshape(n)
    zt = (zeros.float().reshape(n) - offset) * s
    return CpuInt8Weight(w8.contiguous(), s.to(COMPUTE_DTYPE), zt if bool(zt.any()) else None, k)


def cpu_int8_weight_matmul(x: torch.Tensor, w: CpuInt8Weight) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` in ``x.dtype`` (computed in bf16)."""
    k = x.shape[-1]
    x2 = _to_compute(x, k)
    if w.qweight.shape[1] != k:
        x2 = F.pad(x2, (0, w.qweight.shape[1] - k))
    y = torch.ops.aten._weight_int8pack_mm(x2, w.qweight, w.scales)
    if w.zero_term is not None:  # (q - z) s = (q - c) s - (z - c) s
        y = y.float() - x2.float().sum(-1, keepdim=True) * w.zero_term
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


# ---- anything else: dequantize once ------------------------------------------------------
@dataclass
class DenseWeight:
    weight: torch.Tensor  # [N, K] in the compute dtype (bf16 on CPU)

    def nbytes(self) -> int:
        return _nbytes(self.weight)


def dense_weight(q, scales, zeros, g_idx: torch.Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> DenseWeight:
    """Dequantize once (float32 math) and keep a ``dtype`` copy: for formats no low-bit op takes."""
    return DenseWeight(dequantize(q, scales, zeros, g_idx).to(dtype))


def dense_matmul(x: torch.Tensor, w: DenseWeight) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` in ``x.dtype`` (computed in the weight's dtype)."""
    return F.linear(x.to(w.weight.dtype), w.weight).to(x.dtype)


# ---- W8A8 ----------------------------------------------------------------------------------
def int8_matmul_cpu(x_int8: torch.Tensor, w_int8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                    out_dtype: torch.dtype = torch.bfloat16, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch._int_mm(x_int8 [M, K], w_int8 [N, K]^T)`` (int32) scaled per token and channel."""
    acc = torch._int_mm(x_int8, w_int8.t())  # [M, N] int32
    y = acc.float() * x_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
