"""ggml block encoders against their definitions: hand-built blocks byte for byte, and round trips
through a decoder written from ggml-common.h's ``dequantize_row_*`` (and gguf's own numpy one)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from quantkit.pack.ggml import BLOCK_TYPES, DoesNotFit, block_type_for, encode_blocks, encode_grid

TYPE_SIZE = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}  # bytes per 32 weights (ggml-common.h)


def decode(rows: torch.Tensor, name: str) -> torch.Tensor:
    """ggml-common.h, block by block: ``d`` fp16 [, ``m`` fp16] [, ``qh`` uint32 LE] then ``qs``;
    4/5-bit: weight j in the low nibble of qs[j], weight j+16 in its high nibble, bit 4 of weight
    j in bit j of qh; Q8_0: 32 int8.  Weight = d * q (+ m), in float32."""
    blocks = rows.numpy().reshape(rows.shape[0], -1, TYPE_SIZE[name])  # [out, n_blocks, type_size]
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # [out, n_blocks, 1]
    if name == "Q8_0":
        return torch.from_numpy(d * blocks[..., 2:].view(np.int8).astype(np.float32)).reshape(rows.shape[0], -1)
    asym = name.endswith("_1")
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32) if asym else None
    at = 4 if asym else 2
    qs = blocks[..., -16:].astype(np.int64)
    q = np.concatenate([qs & 0xF, qs >> 4], -1)  # [out, n_blocks, 32]: weights 0..15, then 16..31
    if name.startswith("Q5"):
        qh = blocks[..., at:at + 4].copy().view("<u4").astype(np.int64)  # [out, n_blocks, 1]
        q = q | (((qh >> np.arange(32)) & 1) << 4)
    x = d * q.astype(np.float32) + m if asym else d * (q - (16 if name == "Q5_0" else 8)).astype(np.float32)
    return torch.from_numpy(x.astype(np.float32)).reshape(rows.shape[0], -1)


def random_grid(bits, sym, out_f=3, in_f=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    d = (torch.rand(out_f, in_f // 32, generator=g) * 0.05 + 1e-3).half()  # [out, n_blocks]
    z = torch.full_like(d, 2 ** (bits - 1), dtype=torch.float32) if sym else torch.randint(0, 2**bits, d.shape, generator=g).float()
    return codes, d, z


def test_q4_0_block_bytes():
    codes = torch.arange(32).remainder(16).reshape(1, 32)  # weight j and j+16 both hold j % 16
    rows, btype = encode_grid(codes, torch.tensor([[0.5]]).half(), torch.tensor([[8.0]]), bits=4)
    assert btype.name == "Q4_0"
    assert rows.tolist() == [[0x00, 0x38] + [j | (j << 4) for j in range(16)]]  # d = fp16 0.5 = 0x3800


def test_q4_1_block_bytes():
    codes = torch.tensor([[1] * 16 + [2] * 16])
    rows, btype = encode_grid(codes, torch.tensor([[0.25]]).half(), torch.tensor([[3.0]]), bits=4)
    assert btype.name == "Q4_1"
    assert rows.tolist() == [[0x00, 0x34, 0x00, 0xBA] + [0x21] * 16]  # d = 0.25, m = -3 * 0.25 = -0.75 (0xBA00)


def test_q5_0_block_bytes():
    codes = torch.arange(32).reshape(1, 32)  # bit 4 set for weights 16..31
    rows, btype = encode_grid(codes, torch.tensor([[1.0]]).half(), torch.tensor([[16.0]]), bits=5)
    assert btype.name == "Q5_0"
    assert rows.tolist() == [[0x00, 0x3C, 0x00, 0x00, 0xFF, 0xFF] + [j | (j << 4) for j in range(16)]]


def test_q8_0_block_bytes():
    codes = torch.arange(32).reshape(1, 32) + 112  # stored as int8 q - 128 = -16..15
    rows, btype = encode_grid(codes, torch.tensor([[1.0]]).half(), torch.tensor([[128.0]]), bits=8)
    assert btype.name == "Q8_0"
    assert rows.tolist() == [[0x00, 0x3C] + [(j - 16) & 0xFF for j in range(32)]]


@pytest.mark.parametrize("bits,name", [(4, "Q4_0"), (5, "Q5_0"), (8, "Q8_0")])
def test_symmetric_round_trip_is_exact(bits, name):
    codes, d, z = random_grid(bits, sym=True)
    rows, btype = encode_grid(codes, d, z, bits)
    assert btype.name == name and rows.dtype == torch.uint8 and rows.shape == (3, 2 * TYPE_SIZE[name])
    expected = (codes - 2 ** (bits - 1)).float() * d.float().repeat_interleave(32, dim=1)  # d * (q - zero)
    assert torch.equal(decode(rows, name), expected)
    assert torch.equal(torch.from_numpy(quants.dequantize(rows.numpy(), GGMLQuantizationType[name]).copy()), expected)


@pytest.mark.parametrize("bits,name", [(4, "Q4_1"), (5, "Q5_1")])
def test_asymmetric_round_trip_holds_codes_scales_and_the_fp16_offset(bits, name):
    codes, d, z = random_grid(bits, sym=False)
    rows, btype = encode_grid(codes, d, z, bits)
    assert btype.name == name and rows.shape == (3, 2 * TYPE_SIZE[name])
    m = (-z * d.float()).half().float()  # the offset is stored in fp16: x = d * q + m
    expected = codes.float() * d.float().repeat_interleave(32, dim=1) + m.repeat_interleave(32, dim=1)
    assert torch.equal(decode(rows, name), expected)
    assert torch.equal(torch.from_numpy(quants.dequantize(rows.numpy(), GGMLQuantizationType[name]).copy()), expected)


def test_symmetric_zeros_choose_the_symmetric_type():
    # explicit zeros that all equal 2**(bits-1) (GPTQ/AWQ imports) are a symmetric grid
    codes, d, z = random_grid(4, sym=True)
    assert encode_grid(codes, d, z, 4)[1].name == "Q4_0"
    z[0, 1] = 7
    assert encode_grid(codes, d, z, 4)[1].name == "Q4_1"


@pytest.mark.parametrize("bits,sym,match", [(3, True, "3-bit symmetric"), (8, False, "8-bit asymmetric"),
                                            (2, False, "2-bit asymmetric"), (6, True, "6-bit symmetric")])
def test_grids_without_an_exact_type_do_not_fit(bits, sym, match):
    codes, d, z = random_grid(bits, sym)
    with pytest.raises(DoesNotFit, match=match):
        encode_grid(codes, d, z, bits)


def test_an_offset_beyond_fp16_does_not_fit():
    codes, d, z = random_grid(4, sym=False)
    d[0, 0], z[0, 0] = 1000.0, 100.0  # m = -1e5
    with pytest.raises(DoesNotFit, match="overflows fp16"):
        encode_grid(codes, d, z, 4)


def test_block_type_table():
    assert [(t.name, t.bits, t.sym) for t in BLOCK_TYPES] == [("Q4_0", 4, True), ("Q4_1", 4, False), ("Q5_0", 5, True),
                                                             ("Q5_1", 5, False), ("Q8_0", 8, True)]
    assert block_type_for(5, False).name == "Q5_1" and block_type_for(8, False) is None


def test_encode_blocks_rows_are_independent():
    # each output row is its own sequence of blocks: encoding rows one at a time gives the same bytes
    codes, d, z = random_grid(5, sym=False, out_f=4, in_f=96)
    m = (-z * d.float()).half()
    btype = block_type_for(5, False)
    whole = encode_blocks(codes, d, m, btype)
    assert torch.equal(whole, torch.cat([encode_blocks(codes[i:i + 1], d[i:i + 1], m[i:i + 1], btype) for i in range(4)]))
