"""Magnitude pruning: zero the smallest |w| of each layer — the baseline every calibrated
pruning method must beat.  Needs no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

from quantkit.methods.pruning import PruneConfig, PruneMethod
from quantkit.core.sparsity import magnitude_prune
from quantkit.registry import register_method


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    pass


@register_method("magnitude", MagnitudeConfig)
class Magnitude(PruneMethod):
    needs_calibration = False

    def prune_linear(self, w, _stats, target, _spec):
        w_hat, mask, loss = magnitude_prune(w, target)
        return w_hat, mask, None, loss, ""
