"""What the low-rank methods (plain SVD, activation-aware SVD) share: the config choosing each
layer's rank, the factor pair a method returns, and the per-linear loop over a block that
replaces each factorized linear by a :class:`~quantkit.runtime.lowrank.LowRankLinear`.

A layer ``W [out, in]`` becomes ``V @ U`` with ``U [rank, in]`` (applied first) and
``V [out, rank]``; it is factorized only where that stores fewer numbers,
``rank * (in + out) < in * out``.  A method only supplies ``decompose(w, stats) -> (u, v, sigma, note)``:
the full decomposition with components sorted by decreasing ``sigma``, so truncating to rank
``r`` is ``u[:r], v[:, :r]`` and its loss is ``sum(sigma[r:]**2)``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.models.arch import get_module
from quantkit.calibrate.driver import BlockContext, BlockMethod
from quantkit.core.types import LowRankWeight, CompressionResult, LayerRecord
from quantkit.errors import QuantkitError, excerpt
from quantkit.methods.base import each_linear


DEFAULT_RATIO = 0.8  # LowRankConfig.ratio when none of ratio, rank and energy is given


@dataclass(frozen=True)
class LowRankConfig:
    """Exactly one of ``ratio`` (default 0.8), ``rank`` or ``energy`` chooses each layer's rank.

    * ``ratio``: fraction of each layer's parameters kept, ``rank = floor(ratio * in*out / (in+out))``
      (so the factorized layers keep at most ``ratio`` of their parameters; the exact figure is reported);
    * ``rank``: the same rank for every layer;
    * ``energy``: the smallest rank whose components hold this fraction of the (whitened, for
      ``asvd``) squared spectrum, per layer.

    With ``rank`` or ``energy`` a layer whose rank would not reduce its parameters stays dense.

        >>> LowRankConfig(ratio=0.8).rank_for(576, 576)
        230
    """

    ratio: float | None = field(default=None, metadata={
        "help": f"Fraction of each factorized layer's parameters kept (none of ratio, rank, energy given: {DEFAULT_RATIO})."})
    rank: int | None = field(default=None, metadata={"help": "The same rank for every layer instead."})
    energy: float | None = field(default=None, metadata={
        "help": "Per layer, the smallest rank keeping this fraction of the squared spectrum."})

    def __post_init__(self):
        given = [k for k in ("ratio", "rank", "energy") if getattr(self, k) is not None]
        if len(given) > 1:
            raise QuantkitError(f"give one of ratio, rank and energy, not {' and '.join(given)}")
        if not given:
            object.__setattr__(self, "ratio", DEFAULT_RATIO)
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise QuantkitError(f"ratio must be in (0, 1) (the fraction of parameters kept), got {self.ratio}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise QuantkitError(f"rank must be a positive integer, got {excerpt(self.rank)}")
        if self.energy is not None and not 0 < self.energy < 1:
            raise QuantkitError(f"energy must be in (0, 1), got {self.energy}")

    @property
    def needs_spectrum(self) -> bool:
        return self.energy is not None

    def rank_for(self, out_f: int, in_f: int, sigma: torch.Tensor | None = None) -> int | None:
        """The rank of a layer ``[out_f, in_f]``; ``None``: leave it dense (no saving)."""
        if self.ratio is not None:
            r = math.floor(self.ratio * out_f * in_f / (out_f + in_f))
        elif self.rank is not None:
            r = self.rank
        else:
            r = energy_rank(sigma, self.energy)
        r = min(r, out_f, in_f)
        return r if 1 <= r and saves_parameters(out_f, in_f, r) else None


def saves_parameters(out_f: int, in_f: int, rank: int) -> bool:
    """``rank * (in + out) < in * out``: two factors store fewer numbers than the dense weight."""
    return rank * (in_f + out_f) < in_f * out_f


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` with ``sum(sigma[:r]**2) >= energy * sum(sigma**2)`` (``sigma`` descending)."""
    e = sigma.double().pow(2)
    total = float(e.sum())
    if total == 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor([energy], dtype=cum.dtype, device=cum.device)).item()) + 1


def split_factors(Ur: torch.Tensor, sr: torch.Tensor, Vhr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U diag(s) Vh`` as ``(u = sqrt(s) Vh [r, in], v = U sqrt(s) [out, r])``: the singular
    values split evenly, so both factors have the same scale (better conditioned for training
    and low-precision storage)."""
    root = sr.clamp_min(0).sqrt()
    return root.unsqueeze(1) * Vhr, Ur * root.unsqueeze(0)


@contextlib.contextmanager
def _lapack_one_thread():
    """Run the decompositions on one thread, restoring the setting after.  MKL's SVD/eigh on
    layer-sized matrices (hundreds to a few thousand) gains little from threads, and on a
    shared, loaded CPU its spinning threads made a 1536x576 SVD 5-10x slower than one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class LowRankMethod(BlockMethod):
    """Base of the low-rank methods: one statistics pass per block, then every linear factorized
    and replaced in the block (so the next block is calibrated on the factorized outputs)."""

    kind = "lowrank"
    stats_kind: str | None = None  # "hessian", "act" or None (no calibration)
    swaps_linears = True  # each factorized linear becomes a LowRankLinear at once (see process_block)

    def decompose(self, w: torch.Tensor, stats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:  # pragma: no cover
        """``(u [k, in], v [out, k], sigma [k] descending, note)`` with ``k = min(out, in)``."""
        raise NotImplementedError

    def check(self, model, arch):
        """Refuse a model whose linears are already compressed (no dense weight to factorize)."""
        block = arch.blocks(model)[0]
        for name in arch.linear_names(block):
            if not isinstance(getattr(get_module(block, name), "weight", None), nn.Parameter):
                raise QuantkitError(f"{arch.blocks_path}.0.{name} has no dense weight (already compressed?); "
                                    "low-rank factorization starts from a float model")

    def process_block(self, ctx: BlockContext) -> None:
        counts = ctx.result.extra.setdefault("_lowrank_counts", {})
        cfg = self.config
        for name, stats in each_linear(ctx, self.stats_kind):
            t0 = time.perf_counter()
            w = ctx.weight(name)  # [out, in]; read before the module is replaced
            out_f, in_f = w.shape
            r = None if cfg.needs_spectrum else cfg.rank_for(out_f, in_f)
            if r is None and not cfg.needs_spectrum:
                counts[ctx.full_name(name)] = (out_f * in_f, out_f * in_f, None)
                ctx.record(name, None, LayerRecord(ctx.index, name, 0.0, note="left dense: factors would not be smaller"))
                continue
            with _lapack_one_thread():
                u, v, sigma, note = self.decompose(w, stats)
            if cfg.needs_spectrum:
                r = cfg.rank_for(out_f, in_f, sigma)
                if r is None:
                    counts[ctx.full_name(name)] = (out_f * in_f, out_f * in_f, None)
                    ctx.record(name, None, LayerRecord(ctx.index, name, time.perf_counter() - t0,
                                                       note=f"left dense: rank {energy_rank(sigma, cfg.energy)} "
                                                            f"for energy {cfg.energy} would not be smaller"))
                    continue
            lw = LowRankWeight(u[:r].contiguous(), v[:, :r].contiguous())
            ctx.replace(name, lw)  # the block's next runs (and the next block's inputs) use the factors
            counts[ctx.full_name(name)] = (out_f * in_f, r * (out_f + in_f), r)
            loss = float(sigma[r:].double().pow(2).sum())
            full_note = f"rank {r}/{min(out_f, in_f)}" + (f"; {note}" if note else "")
            ctx.record(name, lw, LayerRecord(ctx.index, name, time.perf_counter() - t0, loss, note=full_note))

    def finish(self, model, result: CompressionResult) -> None:
        result.extra["lowrank"] = lowrank_summary(result.extra.pop("_lowrank_counts", {}), model)


def lowrank_summary(counts: dict[str, tuple[int, int, int | None]], model: nn.Module | None = None) -> dict:
    """Parameter counts from ``{module: (params_before, params_after, rank or None)}``.

    ``ratio``: params kept over the factorized layers (what ``--ratio`` targets);
    ``ratio_linears``: over every considered linear (dense ones count in full);
    ``ratio_model``: over the whole model (embeddings, norms and head included).
    """
    fact = {k: c for k, c in counts.items() if c[2] is not None}
    before = sum(c[0] for c in fact.values())
    after = sum(c[1] for c in fact.values())
    lin_before = sum(c[0] for c in counts.values())
    lin_after = sum(c[1] for c in counts.values())
    out = {
        "modules": len(fact), "left_dense": len(counts) - len(fact),
        "params_before": before, "params_after": after, "ratio": after / before if before else 1.0,
        "linear_params_before": lin_before, "linear_params_after": lin_after,
        "ratio_linears": lin_after / lin_before if lin_before else 1.0,
        "ranks": {k: c[2] for k, c in fact.items()},
    }
    if model is not None:
        seen, now = set(), 0
        for p in model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                now += p.numel()
        out["model_params_before"] = now + before - after
        out["model_params_after"] = now
        out["ratio_model"] = now / out["model_params_before"] if now else 1.0
    return out
