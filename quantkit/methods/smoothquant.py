"""SmoothQuant (Xiao et al., 2023): W8A8 with the activation outliers migrated into the weights.

Per group of linears sharing an input, ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (sec. 4,
eq. 4; ``max|W_j|`` over every linear of the group) is folded into the preceding norm (or
linear) through :mod:`quantkit.core.transforms`, then every linear gets int8 per-output-channel
symmetric weights; activations are int8 per token at run time (dynamic), or per tensor with a
scale calibrated here (static).  ``alpha = 0`` means no smoothing at all (naive W8A8; the
formula itself would give ``s = 1 / max|W_j|``).

:func:`smooth_scales` and :func:`quantize_int8_weight` are plain functions of tensors; the
result of each linear is a :class:`W8A8Weight`, loaded by :class:`quantkit.runtime.int8.Int8Linear`.

    >>> s = smooth_scales(act_max, [w_q, w_k, w_v], alpha=0.5)
    >>> q, w_scale = quantize_int8_weight(w * s)
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch

from quantkit.calibrate.driver import BlockMethod
from quantkit.core.types import LayerRecord, W8A8Weight
from quantkit.errors import QuantkitError
from quantkit.core.quant import QuantSpec, quantize_rtn
from quantkit.methods.base import WeightQuantConfig, check_expert_min_tokens, check_module_patterns, each_linear, like
from quantkit.registry import register_method
from quantkit.core.transforms import ScaleResult, fold_blocker, fold_scales

INT8_SPEC = QuantSpec(bits=8, group_size=-1, sym=True)  # per output channel, zero point 128
ACT_QMAX = 127


ACT_QUANT = ("dynamic", "static")  # how activations are quantized (SmoothQuantConfig.act_quant)


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = field(default=0.5, metadata={"help": "SmoothQuant migration strength; 0 = naive W8A8."})
    act_quant: str = field(default="dynamic", metadata={
        "help": "SmoothQuant activations: int8 per token at run time, or one calibrated scale per tensor.",
        "choices": ACT_QUANT})
    smooth_linear_inputs: bool = field(default=True, metadata={
        "help": "SmoothQuant: also smooth groups fed by a linear (up_proj -> down_proj), not only by norms."})
    ignore: tuple = field(default=(), metadata={
        "help": "Regexes of module names left in float (still smoothed: that changes no function)."})
    # W8A8 only: kept so the checkpoint's quantization_config reads like the others
    bits: int = field(default=8, metadata={"help": "SmoothQuant: 8 only (W8A8)."})
    group_size: int = field(default=-1, metadata={"help": "SmoothQuant: -1 only (per-channel weights)."})
    sym: bool = field(default=True, metadata={"help": "SmoothQuant: symmetric only."})
    all_experts: bool = like(WeightQuantConfig, "all_experts")
    expert_min_tokens: int = like(WeightQuantConfig, "expert_min_tokens", metadata={
        "help": "Mixture-of-experts models: an expert routed fewer calibration tokens than this is not smoothed "
                "and quantizes its activations per token at run time, named in the log (0: only experts no token reached)."})

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise QuantkitError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.act_quant not in ACT_QUANT:
            raise QuantkitError(f"act_quant must be 'dynamic' or 'static', got {self.act_quant!r}")
        if (self.bits, self.group_size, self.sym) != (8, -1, True):
            raise QuantkitError("smoothquant is W8A8: int8 per-channel symmetric weights (bits=8, group_size=-1, sym); "
                                f"got bits={self.bits}, group_size={self.group_size}, sym={self.sym}")
        check_module_patterns(self.ignore, ())
        check_expert_min_tokens(self.expert_min_tokens)


def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s [in] = max|X_j|^alpha / max|W_j|^(1-alpha)`` (eq. 4), ``max|W_j|`` over the group's
    ``[out, in]`` weights.  ``alpha = 0`` gives ``s = 1``; channels never active in calibration keep ``s = 1``."""
    if alpha == 0:
        return torch.ones_like(act_max, dtype=torch.float32)
    w_max = torch.cat([w.float().abs() for w in weights], dim=0).amax(dim=0).clamp(min=1e-5)  # [in]
    a = act_max.float()
    s = (a.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
    return torch.where(a > 0, s, torch.ones_like(s))


def quantize_int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` -> int8 codes ``[out, in]`` and scales ``[out]`` (``w ~= q * scale``),
    on the shared symmetric 8-bit grid (codes ``0..255`` around 128, shifted to ``-128..127``)."""
    q, s, z = quantize_rtn(w, INT8_SPEC)  # [out, in] uint8, [out, 1], [out, 1] (z = 128)
    return (q.to(torch.int16) - z.to(torch.int16)).to(torch.int8), s[:, 0].float()


def _smoothed(g, cfg: SmoothQuantConfig) -> bool:
    return cfg.alpha > 0 and (g.prev_kind != "linear" or cfg.smooth_linear_inputs)


def smooth_block(ctx, cfg: SmoothQuantConfig) -> tuple[list[ScaleResult], dict, dict]:
    """Collect ``max|x|`` per input channel, compute every group's smoothing factors, then fold
    them all (a linear may feed another group, so nothing is quantized in between).

    Returns the block-relative results, ``{linear: max|x| [in] of its smoothed input}`` (None: an
    expert the calibration barely reached, quantized per token at run time) and ``{linear: why it was not smoothed}``."""
    stats = ctx.collect("act", ctx.groups)
    act_max, notes, results = {}, {}, []
    for g in ctx.groups:
        why = ctx.experts.starved(g.linears[0], stats[g.linears[0]], floor=1)
        if why:
            ctx.experts.warn(ctx.full_name(g.linears[0]), why, "not smoothed; its activations are quantized per token")
            notes.update({n: f"{why}: not smoothed, per-token activation scales" for n in g.linears})
            act_max.update({n: None for n in g.linears})
            continue
        a = stats[g.linears[0]].abs_max  # [in]
        blocker = fold_blocker(ctx.block, g, ctx.arch.transposed) if _smoothed(g, cfg) else None
        if _smoothed(g, cfg) and blocker is None:
            s = smooth_scales(a, [ctx.weight(n) for n in g.linears], cfg.alpha)
            results.append(ScaleResult(g.prev, g.prev_kind, tuple(g.linears), s, cfg.alpha))
            a = a / s
        elif blocker:
            notes.update({n: f"not smoothed ({blocker})" for n in g.linears})
        act_max.update({n: a for n in g.linears})
    for res in results:
        fold_scales(ctx.block, res, transposed=ctx.arch.transposed, norm_offset=ctx.arch.norm_offset)
    return results, act_max, notes


@register_method("smoothquant", SmoothQuantConfig)
class SmoothQuant(BlockMethod):
    """Smooth each block's groups, then quantize its linears to W8A8.  The in-memory model keeps
    float activations with the int8 weights dequantized; the packed checkpoint runs int8 x int8."""

    folds_scales = True

    def check(self, model, arch):
        if arch.transposed:
            raise QuantkitError(f"smoothquant does not support {arch.name}'s transposed (Conv1D) linears yet")

    def process_block(self, ctx):
        cfg = self.config
        t0 = time.perf_counter()
        results, act_max, notes = smooth_block(ctx, cfg)
        ctx.result.extra.setdefault("smoothquant", []).extend(
            {"prev_op": ctx.full_name(r.prev_op), "linears": [ctx.full_name(n) for n in r.linears]} for r in results)
        smooth_s = (time.perf_counter() - t0) / max(1, len(act_max))  # spread over the block's linears in the log
        for n, _ in each_linear(ctx):  # the statistics were taken by smooth_block, before folding
            if any(re.search(p, ctx.full_name(n)) for p in cfg.ignore):
                ctx.record(n, None, LayerRecord(ctx.index, n, 0.0, note="ignored: left in float"))
                continue
            t1 = time.perf_counter()
            w = ctx.weight(n)
            q, w_scale = quantize_int8_weight(w)
            static = cfg.act_quant == "static" and act_max[n] is not None
            act_scale = float(act_max[n].max().clamp(min=1e-8)) / ACT_QMAX if static else None
            qw = W8A8Weight(q, w_scale, act_scale)
            w_hat = qw.dequantized()
            ctx.set_weight(n, w_hat)
            ctx.record(n, qw, LayerRecord(ctx.index, n, smooth_s + time.perf_counter() - t1,
                                          float((w - w_hat).pow(2).sum()), bits=8, group_size=-1,
                                          note=notes.get(n, "")))
