"""Hadamard matrices and the fast transform, against the dense matrix they stand for."""

from __future__ import annotations

import pytest
import torch

from quantkit.core.hadamard import HadamardTransform, factor_matrix, fwht, random_hadamard, split_size, sylvester
from quantkit.errors import QuantkitError


@pytest.mark.parametrize("n,k,exact", [(64, 1, True), (576, 36, True), (1536, 12, True), (960, 60, True),
                                       (4864, 76, True), (172, 43, False), (11008, 43, False), (13, 13, False)])
def test_split_size_picks_the_smallest_hadamard_factor(n, k, exact):
    got_k, p, got_exact = split_size(n)
    assert (got_k, got_exact) == (k, exact) and got_k * p == n and p & (p - 1) == 0


@pytest.mark.parametrize("k", [12, 20, 28, 36, 44, 60, 76])
def test_paley_factors_are_hadamard_matrices(k):
    h = factor_matrix(k) * k ** 0.5
    assert torch.allclose(h.abs(), torch.ones(k, k, dtype=torch.float64))  # entries +-1
    assert torch.allclose(h @ h.t(), k * torch.eye(k, dtype=torch.float64))


def test_fallback_factor_is_orthonormal():
    d = factor_matrix(43)
    assert torch.allclose(d @ d.t(), torch.eye(43, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 64, 172, 576, 1536, 40, 4096])
def test_fast_transform_matches_the_dense_reference(n):
    t = HadamardTransform(n)
    m = t.matrix()
    assert torch.allclose(m @ m.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(t(x), (x.double() @ m).float(), atol=1e-5, rtol=1e-5)
    assert t(x.bfloat16()).dtype == torch.bfloat16


def test_fwht_is_sylvester_and_refuses_other_sizes():
    x = torch.randn(4, 32, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ sylvester(32))
    with pytest.raises(QuantkitError, match="power of two"):
        fwht(torch.randn(2, 12))


def test_transform_spreads_an_outlier():
    x = torch.zeros(1, 576)
    x[0, 7] = 100.0
    y = HadamardTransform(576)(x)
    assert y.abs().max() < 100.0 / 576 ** 0.5 * 1.0001  # one spike -> flat: max |y| = 100 / sqrt(n)


def test_random_hadamard_is_seeded_and_orthonormal():
    a, b, c = random_hadamard(96, 0), random_hadamard(96, 0), random_hadamard(96, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a @ a.t(), torch.eye(96, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", [64, 1536, 4096])
def test_a_row_gives_the_same_bits_alone_or_in_a_batch(n):
    """The quantized KV cache's batching compares rows bit for bit with the same rows alone."""
    t = HadamardTransform(n)
    x = torch.randn(3, 4, 9, n, generator=torch.Generator().manual_seed(1)) * 10
    batch = t(x)
    assert torch.equal(t(x[1]), batch[1])
    assert torch.equal(t(x[2, :, -1:]), batch[2, :, -1:])
    assert torch.equal(t(x[0, 3, 4]), batch[0, 3, 4])
    assert torch.equal(t(batch, inverse=True)[0, 0, 0], t(batch[0, 0, 0], inverse=True))
