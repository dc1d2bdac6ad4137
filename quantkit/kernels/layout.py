"""Kernel layouts, converted once at load time from quantkit checkpoint format v1.

Checkpoint format v1 (:mod:`quantkit.pack.bits`) stores each output row as a little-endian
bitstream of codes ``[out, ceil(in*bits/8)]`` uint8, with scales/zeros ``[out, n_groups]``.
The Triton kernels want tiles ``[BLOCK_K, BLOCK_N]`` with N the fast axis, so:

* :class:`Int4Weight` (W4A16): ``qweight`` int32 ``[ceil(K/8), N]``; word ``[kw, n]`` holds the
  codes ``q[n, 8*kw : 8*kw+8]``, code ``8*kw + j`` in bits ``4j .. 4j+3`` (GPTQ's layout).
  Because format v1 puts code ``2b`` in the low nibble of byte ``b``, four consecutive bytes of
  a row *are* that int32 word (little-endian): the conversion is a pad, a view and a transpose.
* :class:`Int8Weight` (W8A16): ``qweight`` uint8 ``[K, N]`` (the codes, transposed).

Both carry ``scales [G, N]`` (float), ``zeros [G, N]`` uint8 or ``None`` for symmetric grids
(zero ``2**(bits-1)``), and ``g_idx [K]`` int32 or ``None`` (then ``g = k // group_size``).

    >>> q = torch.randint(0, 16, (6, 40), dtype=torch.uint8)
    >>> w = int4_weight_from_codes(q, torch.ones(6, 5), None, None, group_size=8)
    >>> torch.equal(unpack_int4_weight(w), q)
    True
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Int4Weight:
    qweight: torch.Tensor  # int32 [ceil(K/8), N]
    scales: torch.Tensor  # float [G, N]
    zeros: torch.Tensor | None  # uint8 [G, N]; None = symmetric (zero 8)
    g_idx: torch.Tensor | None  # int32 [K]; None = k // group_size
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.g_idx) if t is not None)


@dataclass
class Int8Weight:
    qweight: torch.Tensor  # uint8 [K, N]
    scales: torch.Tensor  # float [G, N]
    zeros: torch.Tensor | None  # uint8 [G, N]; None = symmetric (zero 128)
    g_idx: torch.Tensor | None  # int32 [K]; None = k // group_size
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.g_idx) if t is not None)


def _group_params(scales, zeros, g_idx):
    """``[N, G]`` checkpoint scales/zeros -> the kernels' ``[G, N]`` (zeros as uint8)."""
    s = scales.t().contiguous()
    z = None if zeros is None else zeros.float().round().to(torch.uint8).t().contiguous()
    g = None if g_idx is None else g_idx.to(torch.int32).contiguous()
    return s, z, g


def pack_int4_words(q: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, K]`` in ``[0, 16)`` -> int32 words ``[ceil(K/8), N]``, 8 codes along K per word."""
    n, k = q.shape
    qp = F.pad(q.to(torch.int64), (0, (-k) % 8)).reshape(n, -1, 8)  # [N, K/8, 8]
    shifts = torch.arange(8, dtype=torch.int64, device=q.device) * 4
    words = (qp << shifts).sum(-1)  # [N, K/8] in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # reinterpret as signed
    return words.t().contiguous()


def int4_words_from_packed(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Format-v1 4-bit rows ``[N, ceil(K/2)]`` uint8 -> int32 words ``[ceil(K/8), N]`` (no unpacking)."""
    if sys.byteorder != "little":  # the view below reads four bytes as one little-endian word
        from quantkit.pack.bits import unpack_bits

        return pack_int4_words(unpack_bits(qweight, 4, in_features))
    n_words = (in_features + 7) // 8
    rows = F.pad(qweight[:, : (in_features + 1) // 2], (0, 4 * n_words - (in_features + 1) // 2))
    return rows.contiguous().view(torch.int32).t().contiguous()  # [N, K/8] -> [K/8, N]


def int4_weight_from_packed(qweight, scales, zeros, g_idx, group_size: int, in_features: int) -> Int4Weight:
    """Build the W4A16 layout from a format-v1 ``QuantLinear``'s buffers."""
    s, z, g = _group_params(scales, zeros, g_idx)
    return Int4Weight(int4_words_from_packed(qweight, in_features), s, z, g, group_size, in_features)


def int4_weight_from_codes(q, scales, zeros, g_idx, group_size: int) -> Int4Weight:
    """Build the W4A16 layout from unpacked codes ``q [N, K]`` and ``scales``/``zeros [N, G]``."""
    s, z, g = _group_params(scales, zeros, g_idx)
    return Int4Weight(pack_int4_words(q), s, z, g, group_size, q.shape[1])


def unpack_int4_weight(w: Int4Weight) -> torch.Tensor:
    """Inverse of the word packing: codes ``[N, K]`` uint8."""
    words = w.qweight.t().to(torch.int64) & 0xFFFFFFFF  # [N, K/8]
    shifts = torch.arange(8, dtype=torch.int64, device=words.device) * 4
    q = (words.unsqueeze(-1) >> shifts) & 0xF  # [N, K/8, 8]
    return q.reshape(words.shape[0], -1)[:, : w.in_features].to(torch.uint8)


def int8_weight_from_codes(q, scales, zeros, g_idx, group_size: int) -> Int8Weight:
    """Build the W8A16 layout from 8-bit codes ``q [N, K]`` (format v1's 8-bit rows are the codes)."""
    s, z, g = _group_params(scales, zeros, g_idx)
    return Int8Weight(q.to(torch.uint8).t().contiguous(), s, z, g, group_size)


def group_map(g_idx: torch.Tensor | None, group_size: int, in_features: int, device=None) -> torch.Tensor:
    """Column -> group ``[K]`` (act-order ``g_idx`` or ``k // group_size``)."""
    if g_idx is not None:
        return g_idx
    return torch.arange(in_features, dtype=torch.int32, device=device) // group_size
