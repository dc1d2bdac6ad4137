"""The Hessian of the layer-wise reconstruction loss, ``H = 2 X^T X / n`` (GPTQ sec. 3, SparseGPT
sec. 3), accumulated once and shared by GPTQ, SparseGPT and whitened SVD.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


class HessianAccumulator:
    """Running ``2/n * sum_t x_t x_t^T`` over every token seen (float32, ``[in, in]``)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [..., in] -> [tokens, in]
        t = x.shape[0]
        if t == 0:
            return
        self.H *= self.n / (self.n + t)
        self.n += t
        x = x * math.sqrt(2 / self.n)
        self.H.addmm_(x.t(), x)


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Input channels never excited by the calibration data (zero diagonal)."""
    return torch.diag(H) == 0


def damped_cholesky(H: torch.Tensor, percdamp: float, tries: int = 4,
                    finish: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor | None, float]:
    """Lower Cholesky factor ``L`` of ``H + d * mean(diag H) * I`` (in ``H``'s dtype), ``d = percdamp``
    raised x10 (from at least 1e-4) while the damped matrix is not positive definite (ill-conditioned
    or rank-deficient ``H``: few tokens, dead channels).  ``finish(L)``, when given, is part of the
    try (a failure or a non-finite result there raises the damping too) and is what is returned.

    Returns ``(finish(L) or L, d)``, or ``(None, last d)`` when every try fails or ``H`` saw nothing.
    The one damped Cholesky: GPTQ/SparseGPT invert with it, SVD-LLM whitens with it.
    """
    mean_diag = torch.mean(torch.diag(H))
    if not float(mean_diag) > 0:
        return None, percdamp
    idx = torch.arange(H.shape[0], device=H.device)
    damp = percdamp
    for _ in range(tries):
        Hd = H.clone()
        Hd[idx, idx] += max(damp, 1e-10) * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            try:
                out = finish(L) if finish is not None else L
            except torch.linalg.LinAlgError:
                out = None
            if out is not None and torch.isfinite(out).all():
                return out, damp
        damp = max(damp, 1e-4) * 10
    return None, damp


def upper_inverse_factor(L: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``(L L^T)^-1``: what GPTQ's column loop reads (Alg. 1)."""
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def robust_inverse_cholesky(H: torch.Tensor, percdamp: float, tries: int = 4) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of ``(H + damp*I)^-1`` (:func:`damped_cholesky`); ``(None, last)`` if all fail."""
    return damped_cholesky(H, percdamp, tries, finish=upper_inverse_factor)
