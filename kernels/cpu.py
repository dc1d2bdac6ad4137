"""CPU fast paths: PyTorch's own low-bit CPU ops, fed layouts converted once at load.

* int4 (any format with <= 4 bits): ``_convert_weight_to_int4pack_for_cpu`` +
  ``_weight_int4pack_mm_for_cpu``.  The op dequantizes ``(q - 8) * scale + zero``; our grid is
  ``(q - z) * s``, so ``zero = (8 - z) * s`` (exact for 2/3-bit codes too, stored as nibbles).
  Limits handled here: group sizes 32/64/128/256 (a larger multiple, e.g. per-channel, is split
  into equal-scale groups), N a multiple of 16 (rows are padded), act-order (the columns are
  sorted by group at load and the activations gathered the same way per call).
* int8 weight-only, per-channel (5-8 bits): ``_weight_int8pack_mm`` on ``q - 2**(bits-1)``
  (int8), plus ``- sum(x) * (z - 2**(bits-1)) * s`` for asymmetric grids.  Its bf16 kernel
  reads past the end when K is not a multiple of 16 (NaNs, torch 2.13), so K is zero-padded.
* W8A8: ``torch._int_mm`` (int32 accumulation) then the per-token x per-channel scales.
* Anything else (group-wise 5-8 bit, odd group sizes): the weight dequantized once to bf16.

These ops are fast with bf16 activations and very slow with float32, so every path here runs
in bf16: float32 ``x`` is cast to bf16 and the output cast back to ``x.dtype``.  The bf16
scales (rounded from fp16) add a relative error of about 2**-9 per weight, well under the
quantization noise; the tests bound the output error at 1e-2 relative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantkit.kernels.layout import group_map
from quantkit.numerics.quant import dequantize

CPU_INT4_GROUP_SIZES = (256, 128, 64, 32)
COMPUTE_DTYPE = torch.bfloat16


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _to_compute(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(-1, k).to(COMPUTE_DTYPE).contiguous()


# ---- int4 -------------------------------------------------------------------------------
@dataclass
class CpuInt4Weight:
    packed: torch.Tensor  # uint8 [N_pad, K/2], PyTorch's opaque CPU int4 layout
    scale_zeros: torch.Tensor  # bf16 [K/group, N_pad, 2]: (scale, (8 - z) * scale)
    group_size: int  # the op's group size (divides the checkpoint's)
    out_features: int
    perm: torch.Tensor | None  # int64 [K]: act-order column order (x is gathered by it)

    def nbytes(self) -> int:
        return _nbytes(self.packed, self.scale_zeros, self.perm)


def cpu_int4_weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
                    group_size: int) -> CpuInt4Weight | None:
    """Codes ``q [N, K]`` (< 16), ``scales``/``zeros [N, G]`` (float) -> CPU int4 layout, or None
    if the op cannot express this format."""
    n, k = q.shape
    if q.numel() and int(q.max()) > 15:
        return None
    perm = None
    if g_idx is not None:
        default = group_map(None, group_size, k, g_idx.device).long()
        if not torch.equal(g_idx.long(), default):
            # act-order: sort columns by group; works when every group keeps group_size columns
            perm = torch.argsort(g_idx.long(), stable=True)
            if not torch.equal(g_idx.long()[perm], default):
                return None
            q = q[:, perm]
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


def cpu_int4_matmul(x: torch.Tensor, w: CpuInt4Weight) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` in ``x.dtype`` (computed in bf16).  Called per linear per
    token in decode, so it does no work it can skip."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != COMPUTE_DTYPE:
        x2 = x2.to(COMPUTE_DTYPE)
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), w.packed, w.group_size, w.scale_zeros)
    if y.shape[1] != w.out_features:
        y = y[:, : w.out_features]
    y = y.reshape(*x.shape[:-1], w.out_features)
    return y if y.dtype == x.dtype else y.to(x.dtype)


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
