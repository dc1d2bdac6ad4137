"""Wanda (Sun et al., 2024): prune by weight magnitude times input activation norm, compared
within each output row — no weight update, one statistics pass per block.

:func:`wanda_prune` is the algorithm; :class:`Wanda` feeds it the per-channel input norms
``||X_j||_2`` of the shared activation collector (:class:`quantkit.core.stats.ActStats`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.methods.pruning import PruneConfig, PruneMethod
from quantkit.core.sparsity import SparsityTarget, select_mask
from quantkit.registry import register_method


@dataclass(frozen=True)
class WandaConfig(PruneConfig):
    pass


def wanda_scores(W: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| * ||X_j||_2`` (eq. 1): ``W [out, in]``, ``act_norm [in]`` -> ``[out, in]``."""
    return W.float().abs() * act_norm.float().reshape(1, -1)


def wanda_prune(W: torch.Tensor, act_norm: torch.Tensor, target: SparsityTarget) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(w_hat, mask True = pruned, loss)``: the lowest scores of each output row (sec. 3,
    "per output") or of each N:M group.  ``loss = sum of pruned S_ij^2``, the output error the
    score estimates (cross terms between input channels ignored).

        >>> w_hat, mask, _ = wanda_prune(torch.randn(4, 8), torch.rand(8), SparsityTarget(0.5))
        >>> mask.sum(1).tolist()
        [4, 4, 4, 4]
    """
    W = W.float()
    scores = wanda_scores(W, act_norm)
    mask = select_mask(scores, target, per_row=True)
    return W.masked_fill(mask, 0), mask, float(scores[mask].pow(2).sum())


@register_method("wanda", WandaConfig)
class Wanda(PruneMethod):
    stats_kind = "act"

    def prune_linear(self, w, stats, target, _spec):
        w_hat, mask, loss = wanda_prune(w, stats.l2_norm, target)
        return w_hat, mask, None, loss, ""
