"""Plain truncated SVD: ``W ~= U_r diag(s_r) Vh_r``, the best rank-``r`` approximation of the
weight in Frobenius norm (Eckart-Young) — and a poor one of the layer's output, because it
ignores which input directions the activations use (on LLaMA-7B at 20% compression: perplexity
20061, vs 7.94 for the activation-aware SVD-LLM).  The baseline :mod:`quantkit.methods.asvd`
must beat.  Needs no calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.methods.lowrank import LowRankConfig, LowRankMethod, split_factors
from quantkit.registry import register_method


@dataclass(frozen=True)
class SVDConfig(LowRankConfig):
    pass


def svd_factorize(W: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u [r, in], v [out, r], sigma [min(out, in)])`` with ``v @ u`` the rank-``r`` truncated
    SVD of ``W [out, in]`` (every component when ``rank`` is ``None``); ``sigma`` is the whole
    spectrum, so ``sum(sigma[r:]**2) = ||W - v @ u||_F^2``.

        >>> W = torch.randn(8, 3) @ torch.randn(3, 6)
        >>> u, v, s = svd_factorize(W, 3)
        >>> torch.allclose(v @ u, W, atol=1e-5)
        True
    """
    U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)  # [out, k], [k], [k, in]
    r = s.numel() if rank is None else min(rank, s.numel())
    u, v = split_factors(U[:, :r], s[:r], Vh[:r])
    return u.float(), v.float(), s.float()


@register_method("svd", SVDConfig)
class SVD(LowRankMethod):
    needs_calibration = False

    def decompose(self, w, _stats):
        u, v, s = svd_factorize(w)
        return u, v, s, ""
