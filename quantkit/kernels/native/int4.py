"""The int4 GEMM of quantkit's native CPU kernels (``kernels/int4_gemm.c``): the layout and its calls.

PyTorch's ``_weight_int4pack_mm_for_cpu`` unpacks nibbles at ~8 GB/s per core here, a third of
what one core can stream; with AVX-512 BF16 this kernel turns a nibble into a bf16 weight with one
ternary-logic op (``0x4300 | q`` is bf16 ``128 + q``) and multiplies with ``vdpbf16ps``; with AVX2 one
AND leaves each nibble in place as an exact float and one FMA meets it with a pre-scaled
activation (see the C file for the algebra, ``qk.h`` for the layout), so decode is bound by
memory, not by unpacking (AVX2, 2 threads: 10-13 GB/s of int4 weights against PyTorch's 4-6).  It also takes
float32 activations directly (no cast ops around each linear), adds the bias, writes outputs of
any width without padding, and dequantizes exactly for the many-row float32 path
(:mod:`quantkit.kernels.cpu`).  Under ``torch.compile`` both calls are the custom ops
``quantkit::int4_mm`` / ``quantkit::int4_dequant`` (opaque to the compiler, no graph break).

    >>> w = int4_weight(q, scales, zeros, perm=None, group_size=64)   # doctest: +SKIP
    >>> y = int4_matmul(x, w)                                          # x [..., K] -> [..., N]
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantkit.kernels.native.build import Int4WeightStruct, available, library, ptr


@dataclass
class NativeInt4Weight:
    """Packed for ``int4_gemm.c`` (layout in ``qk.h``): codes, fp16 scales and (asymmetric) uint8 zeros."""

    w: torch.Tensor  # uint8 [N16/16, K8/8, 64]
    s16: torch.Tensor  # float16 [N16/16, G, 16]
    z: torch.Tensor | None  # uint8 [N16/16, G, 16]; None: every zero is zconst
    zconst: float
    in_features: int  # K
    k_padded: int  # K8
    group_size: int  # in the layout (K8 when the row is one group)
    out_features: int  # N
    perm: torch.Tensor | None  # int64 [K]: act-order column order (x is gathered by it)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.s16, self.z, self.perm) if t is not None)

    def __post_init__(self):
        # raw pointers into the tensors above, for the C call: rebuilt on copy, never pickled
        self.desc = ctypes.pointer(Int4WeightStruct(self.w.data_ptr(), self.s16.data_ptr(), ptr(self.z), ptr(self.perm),
                                                    self.out_features, self.in_features, self.k_padded,
                                                    self.group_size, self.zconst))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "desc"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()


def int4_weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, perm: torch.Tensor | None,
                group_size: int) -> NativeInt4Weight | None:
    """Codes ``q [N, K]`` (< 16, columns already in ``perm`` order), float ``scales``/``zeros
    [N, G]`` (scales are stored as fp16, as checkpoints hold them) -> the layout, or None if the
    kernel is unavailable or the format does not fit (a group size that is not a multiple of 8
    on a row of several groups, non-integer zeros)."""
    if not available():
        return None
    n, k = q.shape
    n_groups = scales.shape[1]
    if n_groups == 1:
        k8, gs = -(-k // 8) * 8, -(-k // 8) * 8
    elif group_size % 8 == 0 and group_size * n_groups == k:
        k8, gs = k, group_size
    else:
        return None
    if q.numel() and int(q.max()) > 15:
        return None
    zeros = zeros.float()
    if not torch.equal(zeros, zeros.round()) or (zeros.numel() and (zeros.min() < 0 or zeros.max() > 255)):
        return None
    n16 = -(-n // 16) * 16
    codes = F.pad(q.to(torch.uint8), (0, k8 - k, 0, n16 - n))  # [N16, K8], one byte per code
    c = codes.reshape(n16 // 16, 16, k8 // 8, 4, 2)  # [NB, r, chunk, t, j]: column k0 + 2t + j
    lo = c[:, :, :, 0] | (c[:, :, :, 1] << 4)  # nibbles t = 0, 1 of word (r, j): its low byte
    hi = c[:, :, :, 2] | (c[:, :, :, 3] << 4)  # nibbles t = 2, 3: its high byte (little-endian)
    w = torch.stack([lo, hi], dim=-1).permute(0, 2, 1, 3, 4).contiguous()  # [NB, chunk, r, j, byte] = 64 bytes a chunk

    def by_block(t: torch.Tensor) -> torch.Tensor:  # [N, G] -> [NB, G, 16], padded rows 0
        return F.pad(t, (0, 0, 0, n16 - n)).reshape(n16 // 16, 16, n_groups).transpose(1, 2).contiguous()

    s16 = by_block(scales.float()).to(torch.float16)
    z0 = float(zeros.flatten()[0]) if zeros.numel() else 0.0
    uniform = bool((zeros == z0).all())
    z = None if uniform else by_block(zeros).to(torch.uint8)
    return NativeInt4Weight(w.reshape(n16 // 16, k8 // 8, 64), s16, z, z0 if uniform else 0.0, k, k8, gs, n,
                            None if perm is None else perm.long().contiguous())


def int4_matmul(x: torch.Tensor, w: NativeInt4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K]`` (float32 or bf16) ``-> [..., N]`` in ``x.dtype``: bf16 products, float32
    sums, ``+ bias`` (float32 ``[N]``) if given.  One ctypes call, no other op (under
    ``torch.compile``: the ``quantkit::int4_mm`` custom op, so the graph does not break)."""
    if torch.compiler.is_compiling():
        return torch.ops.quantkit.int4_mm(x, w.w, w.s16, w.z, w.perm, bias, w.in_features, w.k_padded, w.group_size,
                                          w.out_features, w.zconst)
    if not x.is_contiguous():
        x = x.contiguous()
    m = x.numel() // w.in_features
    y = torch.empty(*x.shape[:-1], w.out_features, dtype=x.dtype)
    if m == 0:
        return y
    rc = library().qk_int4_mm(w.desc, x.data_ptr(), x.dtype == torch.bfloat16, y.data_ptr(), m, ptr(bias),
                              torch.get_num_threads())
    if rc != 0:
        raise MemoryError("quantkit int4 kernel: out of memory for its activation buffer")
    return y


def dequantize_rows(w: NativeInt4Weight, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``start:stop`` of the weight (``start`` a multiple of 16) as ``dtype`` (float32 or
    bf16) ``[stop - start, K]``, columns in the layout's (``perm``) order; float32 values equal
    the reference's ``(q - z) * s``."""
    if torch.compiler.is_compiling():
        return torch.ops.quantkit.int4_dequant(w.w, w.s16, w.z, w.in_features, w.k_padded, w.group_size, w.zconst,
                                               start, stop, dtype)
    out = torch.empty(stop - start, w.in_features, dtype=dtype)
    library().qk_int4_dequant(w.w.data_ptr(), w.s16.data_ptr(), ptr(w.z), w.zconst, w.in_features, w.k_padded,
                              w.group_size, start, stop, out.data_ptr(), dtype == torch.bfloat16, torch.get_num_threads())
    return out


# ---- torch.compile: the same calls as custom ops (opaque to the compiler, no graph break) -----
@torch.library.custom_op("quantkit::int4_mm", mutates_args=())
def _int4_mm_op(x: torch.Tensor, w: torch.Tensor, s16: torch.Tensor, z: torch.Tensor | None, perm: torch.Tensor | None,
                bias: torch.Tensor | None, in_features: int, k_padded: int, group_size: int, out_features: int,
                zconst: float) -> torch.Tensor:
    return int4_matmul(x, NativeInt4Weight(w, s16, z, zconst, in_features, k_padded, group_size, out_features, perm), bias)


@_int4_mm_op.register_fake
def _(x, w, s16, z, perm, bias, in_features, k_padded, group_size, out_features, zconst):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("quantkit::int4_dequant", mutates_args=())
def _int4_dequant_op(w: torch.Tensor, s16: torch.Tensor, z: torch.Tensor | None, in_features: int, k_padded: int,
                     group_size: int, zconst: float, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    n = s16.shape[0] * 16
    return dequantize_rows(NativeInt4Weight(w, s16, z, zconst, in_features, k_padded, group_size, n, None), start, stop, dtype)


@_int4_dequant_op.register_fake
def _(w, s16, z, in_features, k_padded, group_size, zconst, start, stop, dtype):
    return w.new_empty(stop - start, in_features, dtype=dtype)
