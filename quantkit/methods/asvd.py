"""Activation-aware SVD: factorize the weight in the metric of its inputs, so the truncation
drops what the layer's *outputs* need least.  The default low-rank method.

* ``scaling="whiten"`` (default) — SVD-LLM (Wang et al., 2024), truncation-aware data
  whitening: with ``H = S S^T`` (Cholesky of the input second moment ``X^T X``, from the shared
  :class:`~quantkit.core.hessian.HessianAccumulator`), take the SVD of ``W S``, truncate it
  and multiply back ``S^-1``.  Then ``||(W - W_r) X^T||_F^2 = sum of the dropped sigma^2``
  exactly: each dropped singular value costs its own square (the paper's truncation-aware whitening).
* ``scaling="act"`` — ASVD (Yuan et al., 2023): scale input channel ``j`` by
  ``s_j = mean|x_j| ** alpha`` (the shared :class:`~quantkit.core.stats.ActStats`), SVD of
  ``W diag(s)``, multiply back ``diag(s)^-1``.  Cheaper, diagonal-only.

:func:`whitened_svd` and :func:`act_scaled_svd` are the algorithms (tensors in, tensors out).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantkit.core.hessian import damped_cholesky
from quantkit.errors import QuantkitError
from quantkit.methods.lowrank import LowRankConfig, LowRankMethod, split_factors
from quantkit.methods.svd import svd_factorize
from quantkit.registry import register_method


SCALINGS = ("whiten", "act")  # how activations weigh the decomposition (ASVDConfig.scaling)


@dataclass(frozen=True)
class ASVDConfig(LowRankConfig):
    scaling: str = field(default="whiten", metadata={
        "help": "asvd: Cholesky whitening of X^T X (SVD-LLM) or activation-magnitude scaling, diag mean|x|^alpha (ASVD).",
        "choices": SCALINGS})
    damp: float = field(default=0.01, metadata={
        "help": "asvd whitening damping (fraction of the mean diagonal of X^T X added to its diagonal)."})
    alpha: float = field(default=0.5, metadata={"help": "asvd --scaling act: exponent of mean |x|."})

    def __post_init__(self):
        super().__post_init__()
        if self.scaling not in SCALINGS:
            raise QuantkitError(f"scaling must be 'whiten' or 'act', got {self.scaling!r}")
        if not 0 <= self.damp < 1:
            raise QuantkitError(f"damp must be in [0, 1), got {self.damp}")
        if not 0 < self.alpha <= 2:
            raise QuantkitError(f"alpha must be in (0, 2], got {self.alpha}")


def whitening_factor(H: torch.Tensor, percdamp: float = 0.01, tries: int = 4) -> tuple[torch.Tensor | None, float]:
    """Lower Cholesky factor ``S`` of ``H + damp*I`` in float64 (:func:`quantkit.core.hessian.damped_cholesky`);
    ``(None, last)`` if every try fails."""
    return damped_cholesky(H.double(), percdamp, tries)


def whitened_svd(W: torch.Tensor, H: torch.Tensor, rank: int | None = None, *, percdamp: float = 0.01):
    """SVD-LLM's truncation-aware whitened SVD of ``W [out, in]`` for inputs with second moment
    ``H [in, in]`` (any positive multiple of ``X^T X``).

    Returns ``(u [r, in], v [out, r], sigma [min(out, in)], damp)``, with ``v @ u`` the best
    rank-``r`` approximation of ``W`` in output error ``||(W - v@u) X^T||_F`` (under the damped
    ``H``) and ``sigma`` the whole spectrum of ``W S``; or ``None`` when ``H`` cannot be made
    positive definite (the caller falls back to plain SVD).

        >>> X = torch.randn(256, 6) * torch.tensor([10., 1, 1, .1, .1, .1])
        >>> u, v, s, _ = whitened_svd(torch.randn(4, 6), X.T @ X, rank=2)
    """
    S, damp = whitening_factor(H, percdamp)  # H + damp I = S S^T, S lower [in, in]
    if S is None:
        return None
    U, s, Vh = torch.linalg.svd(W.double() @ S, full_matrices=False)  # W S = U diag(s) Vh
    r = s.numel() if rank is None else min(rank, s.numel())
    u, v = split_factors(U[:, :r], s[:r], Vh[:r])  # factors of W S
    u = torch.linalg.solve_triangular(S, u, upper=False, left=False)  # u S^-1: back to W's input space
    return u.float(), v.float(), s.float(), damp


def act_scaled_svd(W: torch.Tensor, act_mean: torch.Tensor, rank: int | None = None, *, alpha: float = 0.5):
    """ASVD: SVD of ``W diag(s)``, ``s = act_mean ** alpha`` (``act_mean [in]``: mean ``|x_j|``),
    then ``u diag(s)^-1``.  Returns ``(u [r, in], v [out, r], sigma [min(out, in)])``.

        >>> u, v, s = act_scaled_svd(torch.randn(4, 6), torch.rand(6), rank=2)
    """
    s_in = act_mean.double().clamp_min(0).pow(alpha)
    floor = float(s_in.max()) * 1e-6
    s_in = s_in.clamp_min(floor) if floor > 0 else torch.ones_like(s_in)  # dead channels: no scaling
    u, v, sigma = svd_factorize(W.double() * s_in.unsqueeze(0), rank)
    return (u.double() / s_in.unsqueeze(0)).float(), v, sigma


@register_method("asvd", ASVDConfig)
class ASVD(LowRankMethod):
    @property
    def stats_kind(self) -> str:
        return "hessian" if self.config.scaling == "whiten" else "act"

    def decompose(self, w, stats):
        if self.config.scaling == "act":
            u, v, s = act_scaled_svd(w, stats.abs_mean, alpha=self.config.alpha)
            return u, v, s, ""
        res = whitened_svd(w, stats.H, percdamp=self.config.damp)
        if res is None:
            u, v, s = svd_factorize(w)
            return u, v, s, "input second moment not positive definite after damping: plain SVD"
        u, v, s, damp = res
        return u, v, s, (f"damping raised to {damp:g}" if damp != self.config.damp else "")
