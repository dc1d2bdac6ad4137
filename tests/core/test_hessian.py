"""The one damped Cholesky (GPTQ/SparseGPT's inverse factor and SVD-LLM's whitening both use it)."""

import pytest
import torch

from quantkit.core.hessian import HessianAccumulator, damped_cholesky, robust_inverse_cholesky
from quantkit.methods.asvd import whitening_factor


def _hessian(n_in=8, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g)
    acc = HessianAccumulator(n_in)
    acc.add(x)
    return acc.H


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factor_reconstructs_the_damped_matrix(dtype):
    H = _hessian().to(dtype)
    L, damp = damped_cholesky(H, 0.01)
    assert damp == 0.01 and L.dtype == dtype
    want = H + 0.01 * torch.diag(H).mean() * torch.eye(8, dtype=dtype)
    assert torch.allclose(L @ L.T, want, rtol=1e-5, atol=1e-5)


def test_singular_hessian_raises_the_damping_until_it_factors():
    H = torch.tensor([[1.0, 1.0005], [1.0005, 1.0]])  # eigenvalues 2.0005 and -0.0005: not positive definite
    assert damped_cholesky(H, 0.0, tries=1)[0] is None
    L, damp = damped_cholesky(H, 0.0)  # 0 -> 1e-3 of mean(diag) = 1 lifts the negative eigenvalue
    assert damp == pytest.approx(1e-3) and torch.allclose(L @ L.T, H + 1e-3 * torch.eye(2), atol=1e-6)
    assert damped_cholesky(torch.zeros(4, 4), 0.01) == (None, 0.01)  # nothing seen


def test_a_failing_finish_step_raises_the_damping():
    calls = []

    def finish(L):
        calls.append(L)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("first try fails")
        return L

    out, damp = damped_cholesky(_hessian(), 0.01, finish=finish)
    assert len(calls) == 2 and damp == pytest.approx(0.1) and out is calls[1]


def test_gptq_factor_is_the_upper_cholesky_of_the_damped_inverse():
    H = _hessian().double()
    U, damp = robust_inverse_cholesky(H, 0.01)
    Hd = H + damp * torch.diag(H).mean() * torch.eye(8, dtype=H.dtype)
    assert torch.allclose(U.T @ U, torch.linalg.inv(Hd), rtol=1e-8, atol=1e-10)
    assert torch.equal(U, torch.triu(U))


def test_whitening_uses_the_same_factor_in_float64():
    H = _hessian()
    S, damp = whitening_factor(H, 0.01)
    L, damp2 = damped_cholesky(H.double(), 0.01)
    assert torch.equal(S, L) and damp == damp2 and S.dtype == torch.float64
