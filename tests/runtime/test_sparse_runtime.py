"""The packed N:M format and the runtime module that reads it."""

import pytest
import torch

from quantkit.runtime.swap import to_module
import torch.nn.functional as F

from quantkit.errors import QuantkitError
from quantkit.core.sparsity import index_bits, nm_compress, nm_decompress, nm_mask
from quantkit.core.types import NMSparseWeight
from quantkit.runtime.modules import runtime_module_class
from quantkit.runtime.sparse import SparseLinear

PATTERNS = [(2, 4), (4, 8), (1, 4), (1, 2), (3, 8), (5, 16), (100, 256)]


def _nm_weight(out_f, in_f, n, m, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    return w.masked_fill(nm_mask(w.abs(), n, m), 0).to(dtype)


@pytest.mark.parametrize("n,m", PATTERNS)
def test_nm_compress_round_trips_exactly(n, m):
    w = _nm_weight(7, m * 5, n, m)
    w[0, :m] = 0  # a group holding fewer than n nonzeros
    w[1, 0] = 0.0  # a kept weight that happens to be zero
    values, idx = nm_compress(w, n, m)
    assert values.shape == (7, 5 * n) and idx.dtype == torch.uint8 and int(idx.max()) < m
    assert torch.equal(nm_decompress(values, idx, n, m), w)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_linear_round_trips_and_matches_dense(n, m, dtype):
    w = _nm_weight(9, m * 3, n, m, seed=1, dtype=dtype)
    bias = torch.randn(9).to(dtype)
    mod = SparseLinear.from_dense(w, n, m, bias=bias)
    assert torch.equal(mod.dense_weight(), w)
    assert mod.indices.shape[1] == (m * 3 // m * n * index_bits(m) + 7) // 8  # bit-packed positions
    x = torch.randn(1, 5, m * 3).to(dtype)
    assert torch.equal(mod(x), F.linear(x, w, bias))


def test_index_widths():
    assert [index_bits(m) for m in (2, 4, 8, 16, 256)] == [2, 2, 3, 4, 8]
    mod = SparseLinear.from_dense(_nm_weight(576, 576, 2, 4), 2, 4)
    assert mod.weight_bytes() == 576 * 288 * 4 + 576 * 72  # fp32 values + 2-bit indices


def test_state_dict_round_trip_through_from_entry():
    w = _nm_weight(6, 32, 2, 4, seed=2)
    res = NMSparseWeight.from_dense(w, 2, 4)
    assert res.config_entry() == {"kind": "nm_sparse", "n": 2, "m": 4}
    src = to_module(res, torch.ones(6), torch.float32)
    cls = runtime_module_class(res.config_entry()["kind"])
    assert cls is SparseLinear
    dst = cls.from_entry(32, 6, res.config_entry(), bias=True, dtype=torch.float32)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.dense_weight(), w) and torch.equal(dst.bias, torch.ones(6))


def test_refuses_weights_that_are_not_nm():
    with pytest.raises(QuantkitError, match="not 2:4 sparse"):
        nm_compress(torch.ones(2, 8), 2, 4)
    with pytest.raises(ValueError):
        SparseLinear(30, 4, 2, 4)
