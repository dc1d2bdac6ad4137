"""What the pruning methods (SparseGPT, Wanda, magnitude) share: the config they extend, the
up-front checks, and the per-linear loop over a block that records each module's sparsity.

A method only supplies ``prune_linear(w, stats, target, spec) -> (w_hat, mask, qweight, loss, note)``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch

from quantkit.models.arch import get_module, weight_out_in
from quantkit.calibrate.driver import BlockContext, BlockMethod
from quantkit.core.types import CompressionResult, LayerRecord
from quantkit.errors import QuantkitError, excerpt
from quantkit.methods.base import WeightQuantConfig, check_expert_min_tokens, check_module_patterns, each_linear, like, rtn_linear
from quantkit.core.quant import QuantSpec
from quantkit.core.sparsity import SparsityTarget, check_sparsity, magnitude_prune, parse_pattern
from quantkit.core.types import NMSparseWeight


DEFAULT_SPARSITY = 0.5  # PruneConfig.sparsity when neither sparsity nor pattern is given


@dataclass(frozen=True)
class PruneConfig:
    """Uniform ``sparsity`` (default 0.5) or an ``N:M`` ``pattern`` for every linear, with optional
    per-module ``overrides``: a tuple of ``(regex, {"sparsity": s} | {"pattern": "N:M"})`` matched
    against full module names, the last match winning; ``{"sparsity": 0}`` or an ``ignore``
    regex leaves a module dense.
    ``packed``: N:M modules go to the checkpoint as kept values + indices (kind ``"nm_sparse"``)
    instead of dense weights with zeros.

        >>> PruneConfig(pattern="2:4", overrides=((r"mlp\\.down_proj", {"sparsity": 0}),))
    """

    sparsity: float | None = field(default=None, metadata={
        "help": f"Fraction of each linear's weights to prune, in (0, 1) (neither sparsity nor pattern given: {DEFAULT_SPARSITY})."})
    pattern: str | None = field(default=None, metadata={
        "help": "N:M semi-structured sparsity instead: keep N of every M inputs (2:4, 4:8...)."})
    overrides: tuple = field(default=(), metadata={
        "help": "Per-module (regex, {sparsity: s} or {pattern: N:M}), the last match winning."})
    ignore: tuple = field(default=(), metadata={"help": "Regexes of module names left dense (reported in the log)."})
    packed: bool = field(default=False, metadata={
        "help": "With --pattern: store kept values + indices (quantkit runtime) instead of dense zeros."})
    all_experts: bool = like(WeightQuantConfig, "all_experts")
    expert_min_tokens: int = like(WeightQuantConfig, "expert_min_tokens", metadata={
        "help": "Mixture-of-experts models: an expert routed fewer calibration tokens than this is pruned by "
                "magnitude instead, named in the log (0: never)."})

    def __post_init__(self):
        if self.sparsity is None and self.pattern is None:
            object.__setattr__(self, "sparsity", DEFAULT_SPARSITY)
        SparsityTarget.parse(self.sparsity, self.pattern)  # validates
        check_expert_min_tokens(self.expert_min_tokens)
        check_module_patterns(self.ignore, self.overrides)
        for pattern, fields in self.overrides:
            if not isinstance(fields, dict) or len(fields) != 1 or set(fields) - {"sparsity", "pattern"}:
                raise QuantkitError(f"override for {excerpt(pattern)} must be {{'sparsity': s}} or {{'pattern': 'N:M'}}, got {excerpt(fields)}")
            if "pattern" in fields:
                parse_pattern(fields["pattern"])
            elif fields["sparsity"] != 0:
                check_sparsity(fields["sparsity"])
        if self.packed and self.pattern is None:
            raise QuantkitError("a packed checkpoint needs an N:M pattern (--pattern); unstructured sparsity is saved dense")

    def target_for(self, module_name: str) -> SparsityTarget | None:
        """What ``module_name`` is pruned to; ``None`` leaves it dense."""
        if any(re.search(p, module_name) for p in self.ignore):
            return None
        fields = {"pattern": self.pattern} if self.pattern is not None else {"sparsity": self.sparsity}
        for pattern, f in self.overrides:
            if re.search(pattern, module_name):
                fields = f
        if fields.get("sparsity") == 0:
            return None
        return SparsityTarget.parse(fields.get("sparsity"), fields.get("pattern"))

    def spec_for(self, module_name: str) -> QuantSpec | None:
        """The weight format quantized jointly with pruning (SparseGPT only); ``None``: stay float."""
        return None

    @property
    def quantizes(self) -> bool:
        """Whether the kept weights are quantized in the same pass (SparseGPT's ``bits``)."""
        return False


class PruneMethod(BlockMethod):
    """Base of the pruning methods: one statistics pass per block, then every linear pruned."""

    kind = "prune"
    stats_kind: str | None = None  # "hessian", "act" or None (no calibration)

    @property
    def stores_results(self) -> bool:
        """Only packed N:M weights and jointly quantized ones are stored; plain pruning leaves its
        zeros in the float weights."""
        return self.config.packed or self.config.quantizes

    def prune_linear(self, w: torch.Tensor, stats, target: SparsityTarget, spec: QuantSpec | None):  # pragma: no cover
        """``(w_hat [out, in], mask [out, in] True = pruned, QuantizedWeight | None, loss, note)``."""
        raise NotImplementedError

    def check(self, model, arch):
        """Refuse up front an N:M group or a group size that does not divide some layer."""
        for i, block in enumerate(arch.blocks(model)):
            for name in arch.linear_names(block):
                full = f"{arch.blocks_path}.{i}.{name}"
                in_f = weight_out_in(get_module(block, name), arch.transposed).shape[1]
                target = self.config.target_for(full)
                if target is not None:
                    target.check_layer(full, in_f)
                spec = self.config.spec_for(full)
                if spec is not None:
                    spec.check_layer(full, in_f)

    def process_block(self, ctx: BlockContext) -> None:
        counts = ctx.result.extra.setdefault("_prune_counts", {})
        for name, stats in each_linear(ctx, self.stats_kind):
            full = ctx.full_name(name)
            target = self.config.target_for(full)
            spec = self.config.spec_for(full)
            t0 = time.perf_counter()
            if target is None:
                ctx.record(name, None, LayerRecord(ctx.index, name, 0.0, sparsity=0.0, note="left dense (ignore/override)"))
                continue
            w = ctx.weight(name)
            starved = ctx.experts.starved(name, stats)
            if starved:  # an expert the calibration barely reached: magnitude (and round-to-nearest), said by name
                ctx.experts.warn(full, starved, "pruned by magnitude")
                w_hat, mask, loss = magnitude_prune(w, target)
                qw, w_hat = rtn_linear(w_hat, None, spec)[:2] if spec is not None else (None, w_hat)
                note = f"{starved}: magnitude" + (" + RTN" if spec is not None else "")
            else:
                w_hat, mask, qw, loss, note = self.prune_linear(w, stats, target, spec)
            ctx.set_weight(name, w_hat)
            if qw is None and self.config.packed and target.nm is not None:
                qw = NMSparseWeight.from_dense(w_hat, *target.nm)
            pruned = int(mask.sum())
            counts[full] = (pruned, mask.numel())
            ctx.record(name, qw, LayerRecord(ctx.index, name, time.perf_counter() - t0, loss,
                                             bits=spec.bits if spec else None,
                                             group_size=spec.group_size if spec else None,
                                             sparsity=pruned / mask.numel(), note=note))

    def finish(self, model, result: CompressionResult) -> None:
        result.extra["sparsity"] = sparsity_summary(result.extra.pop("_prune_counts", {}))


def sparsity_summary(counts: dict[str, tuple[int, int]]) -> dict:
    """Overall and per-module sparsity from ``{module: (pruned, numel)}``."""
    if not counts:
        return {"overall": 0.0, "min": None, "max": None, "modules": 0, "per_module": {}}
    per = {k: p / n for k, (p, n) in counts.items()}
    total_p = sum(p for p, _ in counts.values())
    total_n = sum(n for _, n in counts.values())
    return {"overall": total_p / total_n, "min": min(per.values()), "max": max(per.values()), "modules": len(per),
            "pruned_weights": total_p, "weights": total_n, "per_module": per}
