"""The Hessian of the layer-wise reconstruction loss, ``H = 2 X^T X / n`` (GPTQ sec. 3, SparseGPT
sec. 3), accumulated once and shared by GPTQ, SparseGPT and whitened SVD.
"""

from __future__ import annotations

import math

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


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp*I)^-1`` with ``damp = percdamp * mean(diag H)``.

    Raises ``torch.linalg.LinAlgError`` when the damped matrix is not positive definite.
    """
    H = H.clone()
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def robust_inverse_cholesky(H: torch.Tensor, percdamp: float, tries: int = 4) -> tuple[torch.Tensor | None, float]:
    """:func:`damped_inverse_cholesky`, raising the damping x10 on failure; ``(None, last)`` if all fail."""
    damp = percdamp
    for _ in range(tries):
        try:
            Hinv = damped_inverse_cholesky(H, damp)
            if torch.isfinite(Hinv).all():
                return Hinv, damp
        except torch.linalg.LinAlgError:
            pass
        damp *= 10
    return None, damp
