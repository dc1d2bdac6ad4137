"""Dense bit packing of integer codes, for every width from 2 to 8 bits.

Layout (quantkit format v1): each row of codes ``[out, in]`` becomes a little-endian
bitstream of ``ceil(in * bits / 8)`` bytes: code ``j`` occupies stream bits
``[j*bits, (j+1)*bits)``, and stream bit ``i`` is bit ``i % 8`` of byte ``i // 8``.
For 4 bits that is two codes per byte, low nibble first; for 8 bits the identity.

    >>> q = torch.randint(0, 8, (3, 10), dtype=torch.uint8)
    >>> torch.equal(unpack_bits(pack_bits(q, 3), 3, 10), q)
    True
"""

from __future__ import annotations

import torch


def packed_row_bytes(in_features: int, bits: int) -> int:
    return (in_features * bits + 7) // 8


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``[out, in]`` codes in ``[0, 2**bits)`` -> ``[out, ceil(in*bits/8)]`` uint8."""
    if q.dim() != 2:
        raise ValueError(f"pack_bits wants a 2-D tensor, got shape {tuple(q.shape)}")
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    out_f, in_f = q.shape
    if 8 % bits == 0:  # 2 and 4 bits: whole codes per byte
        per = 8 // bits
        pad = (-in_f) % per
        qp = torch.nn.functional.pad(q, (0, pad)).reshape(out_f, -1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (qp << shifts).sum(-1).to(torch.uint8)
    # general widths: expand to a bit stream, regroup by 8
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((q.unsqueeze(-1) >> shifts) & 1).reshape(out_f, in_f * bits)  # [out, in*bits]
    pad = (-stream.shape[1]) % 8
    stream = torch.nn.functional.pad(stream, (0, pad)).reshape(out_f, -1, 8).to(torch.int32)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[out, nbytes]`` uint8 -> ``[out, in_features]`` uint8."""
    if bits == 8:
        return packed[:, :in_features].to(torch.uint8)
    out_f = packed.shape[0]
    p = packed.to(torch.int32)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=p.device) * bits
        q = (p.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return q.reshape(out_f, -1)[:, :in_features].to(torch.uint8)
    stream = (p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32, device=p.device)) & 1  # [out, nbytes, 8]
    stream = stream.reshape(out_f, -1)[:, : in_features * bits].reshape(out_f, in_features, bits)
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=p.device)
    return (stream * weights).sum(-1).to(torch.uint8)
