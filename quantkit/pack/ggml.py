"""ggml's block encodings of quantized rows (the types llama.cpp runs), as pure tensor functions.

Every type here holds 32 consecutive weights of a row with one fp16 scale ``d``; the grid of
quantkit codes ``q`` each holds exactly:

============  =====================  ==========================================
quantkit      ggml type              weight of code ``q``
============  =====================  ==========================================
4-bit sym     Q4_0                   ``d * (q - 8)``      (quantkit's zero is 8)
4-bit asym    Q4_1                   ``d * q + m``,  ``m = fp16(-z * d)``
5-bit sym     Q5_0                   ``d * (q - 16)``
5-bit asym    Q5_1                   ``d * q + m``
8-bit sym     Q8_0                   ``d * (q - 128)``    (stored as int8)
============  =====================  ==========================================

The symmetric types reproduce quantkit's dequantized weights bit for bit; the asymmetric ones
differ only by the fp16 rounding of the offset ``m``.  Other grids (2/3/6/7 bits, asymmetric
8-bit) have no exact block type: :func:`encode_grid` raises :class:`DoesNotFit`.

    >>> codes = torch.full((1, 32), 9, dtype=torch.uint8)          # one block, every weight d * (9 - 8)
    >>> d = torch.tensor([[0.5]], dtype=torch.float16)
    >>> rows, btype = encode_grid(codes, d, torch.tensor([[8.0]]), bits=4)
    >>> btype.name, rows.shape                                      # 2 bytes of d + 16 bytes of nibbles
    ('Q4_0', torch.Size([1, 18]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError

BLOCK = 32  # weights per block in every ggml type written here


@dataclass(frozen=True)
class BlockType:
    """A ggml block type and the quantkit grid it holds exactly."""

    name: str
    bits: int
    sym: bool  # sym: x = d * (q - 2**(bits-1)); asym: x = d * q + m


BLOCK_TYPES = (BlockType("Q4_0", 4, True), BlockType("Q4_1", 4, False), BlockType("Q5_0", 5, True),
               BlockType("Q5_1", 5, False), BlockType("Q8_0", 8, True))


class DoesNotFit(QuantkitError):
    """A quantized grid that no ggml block type holds exactly."""


def block_type_for(bits: int, sym: bool) -> BlockType | None:
    return next((t for t in BLOCK_TYPES if t.bits == bits and t.sym == sym), None)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` -> ``[..., n, 2]`` little-endian bytes of fp16 values."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def encode_blocks(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, btype: BlockType) -> torch.Tensor:
    """Rows of ggml blocks: ``codes [out, in]`` (in ``[0, 2**bits)``), per-block scales
    ``d [out, in/32]`` and, for the asymmetric types, offsets ``m [out, in/32]`` ->
    ``uint8 [out, in/32 * type_size]``.

    Block layouts (ggml-common.h): ``d`` (fp16) [, ``m`` (fp16)] [, ``qh`` (uint32: bit j is
    bit 4 of weight j, 5-bit types)], then ``qs``: 4/5-bit types put weight j in the low nibble
    of byte j and weight j+16 in its high nibble; Q8_0 stores ``q - 128`` as 32 int8.
    """
    out_f, in_f = codes.shape
    q = codes.to(torch.int64).reshape(out_f, in_f // BLOCK, BLOCK)  # [out, in] -> [out, n_blocks, 32]
    parts = [_f16_bytes(d)]
    if not btype.sym:
        parts.append(_f16_bytes(m))
    if btype.bits == 8:
        parts.append((q - 128).to(torch.int8).view(torch.uint8))
    else:
        if btype.bits == 5:
            qh = ((q >> 4) & 1) << torch.arange(BLOCK, dtype=torch.int64)  # [out, n_blocks, 32]
            word = qh.sum(-1, keepdim=True)  # [out, n_blocks, 1]
            parts.append((word >> (8 * torch.arange(4, dtype=torch.int64))) & 0xFF)
        lo = q & 0xF
        parts.append(lo[..., : BLOCK // 2] | (lo[..., BLOCK // 2:] << 4))
    return torch.cat([p.to(torch.uint8) for p in parts], -1).reshape(out_f, -1)


def encode_grid(codes: torch.Tensor, d: torch.Tensor, z: torch.Tensor, bits: int) -> tuple[torch.Tensor, BlockType]:
    """Rows of the ggml type that holds a quantkit grid exactly: ``codes [out, in]``, the scale
    ``d [out, in/32]`` (fp16 values) and zero point ``z [out, in/32]`` of each 32-weight block ->
    ``(uint8 [out, in/32 * type_size], type)``; :class:`DoesNotFit` says why no type holds it."""
    sym = bool((z == 2 ** (bits - 1)).all())  # GPTQ/AWQ imports keep explicit zeros; 2**(bits-1) everywhere is symmetric
    btype = block_type_for(bits, sym)
    if btype is None:
        have = ", ".join(f"{t.bits}-bit {'sym' if t.sym else 'asym'} ({t.name})" for t in BLOCK_TYPES)
        raise DoesNotFit(f"{bits}-bit {'symmetric' if sym else 'asymmetric'} grids have no exact ggml block type (exact: {have})")
    m = None
    if not sym:
        m = (-z * d.float()).to(torch.float16)  # x = (q - z) * d = d * q + m
        if not torch.isfinite(m).all():
            raise DoesNotFit("a group offset -z*s overflows fp16")
    return encode_blocks(codes, d, m, btype), btype
