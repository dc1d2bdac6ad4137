"""Magnitude pruning: zero the smallest |w| of each layer — the baseline every calibrated
pruning method must beat.  Needs no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.methods.pruning import PruneConfig, PruneMethod
from quantkit.core.sparsity import SparsityTarget, select_mask
from quantkit.registry import register_method


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    pass


def magnitude_prune(W: torch.Tensor, target: SparsityTarget) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(w_hat, mask True = pruned, sum of pruned w^2)``: the lowest |w| of the whole layer
    (unstructured, as the SparseGPT and Wanda papers' baseline) or of each N:M group.

        >>> w_hat, mask, _ = magnitude_prune(torch.randn(4, 8), SparsityTarget(0.5))
    """
    W = W.float()
    mask = select_mask(W.abs(), target, per_row=False)
    return W.masked_fill(mask, 0), mask, float(W[mask].pow(2).sum())


@register_method("magnitude", MagnitudeConfig)
class Magnitude(PruneMethod):
    needs_calibration = False

    def prune_linear(self, w, _stats, target, _spec):
        w_hat, mask, loss = magnitude_prune(w, target)
        return w_hat, mask, None, loss, ""
