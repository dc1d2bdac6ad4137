"""Checkpoint format v1 -> kernel layouts: exact round trips."""

import pytest
import torch

from quantkit.kernels.layout import (
    int4_weight_from_codes,
    int4_weight_from_packed,
    int8_weight_from_codes,
    pack_int4_words,
    unpack_int4_weight,
)
from quantkit.pack.bits import pack_bits


@pytest.mark.parametrize("n,k", [(1, 8), (3, 40), (5, 13), (16, 1), (2, 7)])
def test_int4_words_round_trip(n, k):
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
    w = int4_weight_from_codes(q, torch.ones(n, 1), None, None, group_size=k)
    assert w.qweight.dtype == torch.int32 and w.qweight.shape == ((k + 7) // 8, n)
    assert torch.equal(unpack_int4_weight(w), q)


@pytest.mark.parametrize("n,k", [(1, 8), (3, 40), (5, 13), (4, 3)])
def test_int4_from_checkpoint_bytes_equals_from_codes(n, k):
    """Format v1's nibble stream viewed as int32 words is exactly the kernel's word packing."""
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    q[0, 0] = 15  # a word with its top nibble set is a negative int32
    q[:, : min(k, 8)] = 15
    s = torch.rand(n, 1)
    z = torch.randint(0, 16, (n, 1)).float()
    from_bytes = int4_weight_from_packed(pack_bits(q, 4), s, z.to(torch.uint8), None, k, k)
    from_codes = int4_weight_from_codes(q, s, z, None, k)
    assert torch.equal(from_bytes.qweight, from_codes.qweight)
    assert torch.equal(from_bytes.zeros, from_codes.zeros) and from_bytes.zeros.shape == (1, n)
    assert torch.equal(from_bytes.scales, s.t())


def test_pack_words_bit_positions():
    q = torch.arange(8, dtype=torch.uint8).reshape(1, 8)  # code j in bits 4j..4j+3
    assert int(pack_int4_words(q)[0, 0]) == 0x76543210


def test_int8_layout_is_transposed_codes():
    q = torch.randint(0, 256, (3, 5), dtype=torch.uint8)
    w = int8_weight_from_codes(q, torch.ones(3, 1), None, None, 5)
    assert torch.equal(w.qweight, q.t()) and w.in_features == 5 and w.out_features == 3
