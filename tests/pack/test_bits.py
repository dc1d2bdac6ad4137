import pytest
import torch

from quantkit.pack.bits import pack_bits, packed_row_bytes, unpack_bits


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("in_features", [1, 5, 8, 64, 67])
def test_pack_unpack_round_trip_is_exact(bits, in_features):
    g = torch.Generator().manual_seed(bits * 100 + in_features)
    q = torch.randint(0, 2**bits, (7, in_features), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (7, packed_row_bytes(in_features, bits))
    assert torch.equal(unpack_bits(packed, bits, in_features), q)


def test_int4_layout_is_two_per_byte_low_nibble_first():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_bits(q, 4).tolist() == [[0x21, 0x0F]]


def test_dense_3bit_uses_three_bits_per_code():
    q = torch.full((2, 64), 7, dtype=torch.uint8)
    assert pack_bits(q, 3).shape == (2, 24)
    assert torch.equal(pack_bits(q, 3), torch.full((2, 24), 255, dtype=torch.uint8))
