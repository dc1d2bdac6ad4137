"""The int32 word layouts of GPTQ and AWQ checkpoints: known words, exact round trips, and AWQ's
interleaved order checked against an independent numpy packer written from AutoAWQ's layout."""

import numpy as np
import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.pack.int32 import AWQ_ORDER, pack_int32, unpack_awq, unpack_int32


def test_int32_packing_matches_the_gptq_layout():
    # 8 four-bit codes along the input dimension fill one int32 word, first code in the low bits
    codes = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [15]])  # [in=8, out=1]
    word = pack_int32(codes, 4, 0)
    assert word.shape == (1, 1) and word.dtype == torch.int32
    assert int(word) & 0xFFFFFFFF == 0xF7654321
    assert torch.equal(unpack_int32(word, 4, 0), codes)


def test_int32_packs_along_the_dimension_asked():
    # along dim 1 (GPTQ's qzeros): column 16c + i of a 2-bit row at bits 2i of word c
    codes = torch.tensor([[3] + [0] * 15 + [0] * 15 + [1]])  # [1, 32]
    words = pack_int32(codes, 2, 1)
    assert words.shape == (1, 2)
    assert [int(w) & 0xFFFFFFFF for w in words[0]] == [0x3, 0x40000000]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int32_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (64, 48), generator=g)
    assert torch.equal(unpack_int32(pack_int32(codes, bits, 0), bits, 0), codes)
    assert torch.equal(unpack_int32(pack_int32(codes, bits, 1), bits, 1), codes)


def test_int32_refuses_a_partial_word():
    with pytest.raises(QuantkitError, match="cannot pack 12 codes into int32 words of 8"):
        pack_int32(torch.zeros(12, 3, dtype=torch.int64), 4, 0)


def awq_pack(codes: np.ndarray) -> np.ndarray:
    """AutoAWQ GEMM, written from its layout: ``[rows, cols]`` 4-bit codes -> ``[rows, cols / 8]``
    int32, nibble i of word c holding column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = codes.shape
    words = np.zeros((rows, cols // 8), dtype=np.uint32)
    for c in range(cols // 8):
        for i in range(8):
            words[:, c] |= codes[:, 8 * c + order[i]].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def test_awq_word_layout():
    # columns 0..7 hold codes 1..8: nibbles (low first) hold columns 0, 2, 4, 6, 1, 3, 5, 7
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    word = torch.tensor([[np.uint32(0x86427531).view(np.int32)]], dtype=torch.int32)
    assert unpack_awq(word).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]


def test_awq_unpacks_the_independent_packer_exactly():
    codes = np.random.default_rng(0).integers(0, 16, (5, 24))
    assert torch.equal(unpack_awq(torch.from_numpy(awq_pack(codes))), torch.from_numpy(codes).to(torch.int64))
