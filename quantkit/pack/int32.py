"""The int32 word layouts GPTQ and AWQ checkpoints store their codes in.

* GPTQ (:mod:`quantkit.checkpoint.gptq`): ``32 // bits`` codes per word along one dimension, code
  ``k`` at bits ``(k % per) * bits`` of word ``k // per`` (low bits first): :func:`pack_int32`,
  :func:`unpack_int32`.
* AWQ GEMM (:mod:`quantkit.checkpoint.awq`): eight 4-bit codes per word along the columns in
  AutoAWQ's interleaved order, nibble ``i`` of word ``c`` holding column ``8c + AWQ_ORDER[i]``:
  :func:`unpack_awq`.

    >>> codes = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [15]])   # [in=8, out=1]
    >>> hex(int(pack_int32(codes, 4, 0)) & 0xFFFFFFFF)
    '0xf7654321'
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output column (within 8) of nibble i


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer codes along ``dim`` into int32 words (``32 // bits`` codes per word, low bits first)."""
    per = 32 // bits
    c = codes.to(torch.int64).movedim(dim, 0)  # [L, ...]
    if c.shape[0] % per:
        raise QuantkitError(f"cannot pack {c.shape[0]} codes into int32 words of {per}")
    c = c.reshape(c.shape[0] // per, per, *c.shape[1:])
    shifts = (torch.arange(per, dtype=torch.int64) * bits).reshape(1, per, *([1] * (c.dim() - 2)))
    words = (c << shifts).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim)


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words along ``dim`` -> int64 codes, ``32 // bits`` per word."""
    per = 32 // bits
    w = words.to(torch.int64).movedim(dim, 0) & 0xFFFFFFFF  # [W, ...]
    shifts = (torch.arange(per, dtype=torch.int64) * bits).reshape(1, per, *([1] * (w.dim() - 1)))
    codes = (w.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(w.shape[0] * per, *w.shape[1:]).movedim(0, dim)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """``[rows, cols / 8]`` int32 words in AWQ's interleaved order -> ``[rows, cols]`` 4-bit codes."""
    nibbles = unpack_int32(words, 4, 1)  # [rows, cols]: nibble i of word c at column 8c + i
    cols = (torch.arange(words.shape[1]).unsqueeze(1) * 8 + torch.tensor(AWQ_ORDER)).reshape(-1)
    codes = torch.empty_like(nibbles)
    codes[:, cols] = nibbles
    return codes
