"""AWQ (Lin et al., 2024): activation-aware weight quantization.

Salient input channels (large mean ``|x|``) are protected by scaling them up in the weight and
down in whatever produces the input, which leaves the float function unchanged (sec. 3.2):
``s = mean|x|^alpha / mean|w|^(1 - alpha)`` (normalised; ``duo_scaling`` off: ``mean|x|^alpha``),
alpha grid-searched on the group's output error with the group quantized; then each weight group's
clipping range on the layer output (llm-awq's auto-clip).  The scaled, clipped weights go to any
weight quantizer: round-to-nearest (``awq``) or GPTQ (``awq+gptq``).

Activation statistics come from every calibration token; the alpha search runs the group on a
sample of ``search_tokens`` tokens (default 512, the sample llm-awq's auto-clip uses) and the
clip search on ``clip_tokens``, which keeps AWQ cheaper than GPTQ on the same calibration set;
``search_tokens=0`` searches on everything.

The search is separate from the apply: :func:`search_scale` and :func:`search_clip` are plain
functions of tensors whose results (``ScaleResult``, ``ClipResult``) :mod:`quantkit.core.transforms` applies.
    >>> s, alpha, loss, history = search_scale(x_mean, [w], loss_fn, [QuantSpec(4, 64)])
    >>> max_val = search_clip(w * s, x[:512] / s, QuantSpec(4, 64))
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from quantkit.models.arch import LinearGroup
from quantkit.calibrate.driver import BlockContext, BlockMethod
from quantkit.core.types import LayerRecord
from quantkit.errors import QuantkitError
from quantkit.methods.base import WeightQuantConfig, check_group_sizes, like, quantize_block_linears
from quantkit.methods.gptq import GPTQ, GPTQConfig
from quantkit.methods.rtn import rtn_linear
from quantkit.core.quant import QuantSpec, compute_qparams, fake_quantize
from quantkit.registry import register_method
from quantkit.core.transforms import ClipResult, ScaleResult, apply_clip, fold_blocker, fold_scales

@dataclass(frozen=True)
class AWQConfig(WeightQuantConfig):
    n_grid: int = field(default=20, metadata={"help": "AWQ: alpha grid points in [0, 1]."})
    duo_scaling: bool = field(default=True, metadata={  # AutoAWQ's and llm-compressor's default too (README: AWQ)
        "help": "AWQ: s = mean|x|^a / mean|w|^(1-a) (AutoAWQ's duo scaling); --no-duo-scaling: s = mean|x|^a."})
    search_tokens: int = field(default=512, metadata={"help": "AWQ: tokens the alpha search runs on; 0 = all."})  # see _Captured
    clip: bool = field(default=True, metadata={"help": "AWQ: search a clipping range per weight group."})  # auto-clip
    clip_grid: int = field(default=20, metadata={"help": "AWQ clip search: shrink steps, each 1/clip-grid of the range."})
    max_shrink: float = field(default=0.5, metadata={"help": "AWQ clip search: clip max |w| to (1 - max-shrink) of itself at most."})
    clip_tokens: int = field(default=512, metadata={"help": "AWQ clip search: input tokens (strided over the calibration set)."})
    clip_exclude: str | None = field(default=None, metadata={
        "help": "AWQ: regex of module names never clipped [default: the architecture's q and k projections, whose "
                "clipping error their own output does not measure (as llm-awq)]."})

    def __post_init__(self):
        super().__post_init__()
        if self.n_grid < 2:
            raise QuantkitError(f"n_grid must be at least 2, got {self.n_grid}")
        if self.search_tokens < 0 or self.clip_tokens < 1 or self.clip_grid < 1:
            raise QuantkitError("search_tokens must be >= 0, clip_tokens and clip_grid positive")
        if not 0 <= self.max_shrink < 1:
            raise QuantkitError(f"max_shrink must be in [0, 1), got {self.max_shrink}")
        try:
            re.compile(self.clip_exclude or "")
        except re.error as e:
            raise QuantkitError(f"bad clip_exclude pattern {self.clip_exclude!r}: {e}") from None


# ---- the algorithm: tensors in, tensors out ------------------------------------------------------
def rtn_fake(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of ``w [out, in]`` on ``spec``'s grid."""
    gs = spec.groups_for(w.shape[1])
    return _fake_rows(w.float().reshape(-1, gs), spec).reshape(w.shape)  # [out, in] -> [out * n_groups, group]


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over the rows of ``|w|`` normalised by its group's max (AutoAWQ's ``w_mean``, ``[in]``)."""
    w = torch.cat([w.float() for w in weights], dim=0)  # [sum out, in]
    gs = w.shape[1] if group_size == -1 else group_size
    wg = w.abs().reshape(-1, gs)
    wg = wg / (wg.amax(dim=1, keepdim=True) + 1e-6)
    return wg.reshape(w.shape).mean(0)


def awq_scales(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``s = mean|x|^alpha`` (``/ w_mean^(1-alpha)`` with duo scaling), normalised so that
    ``max(s) * min(s) = 1`` (sec. 3.2, eq. 5)."""
    s = x_mean.float().pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.float().pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scale(x_mean: torch.Tensor, weights: list[torch.Tensor], loss_fn: Callable[[list[torch.Tensor]], float],
                 specs: list[QuantSpec], n_grid: int = 20, duo_scaling: bool = False,
                 quantize: Callable[[torch.Tensor, QuantSpec], torch.Tensor] = rtn_fake):
    """Grid-search alpha in [0, 1] for one group of linears sharing an input.

    ``x_mean [in]``: mean ``|x|`` per input channel; ``weights``: the group's ``[out, in]``
    weights; ``loss_fn(w_hats)`` returns the group's output error when its linears compute with
    ``w_hats`` (= ``Q(W s) / s``, i.e. the scaled weights quantized, seen from the unscaled input).
    A ``None`` spec marks a linear left in float (``w_hat = w``).
    Returns ``(s [in], alpha, loss, history)``; without ``duo_scaling`` ``alpha = 0`` (``s = 1``)
    is plain RTN, so the chosen loss is never above RTN's on the search data (AWQConfig turns it on).
    """
    group_size = next((spec.group_size for spec in specs if spec is not None), -1)
    w_mean = weight_mean(weights, group_size) if duo_scaling else None
    best = (math.inf, None, None)
    history = []
    for i in range(n_grid):
        alpha = i / (n_grid - 1)
        s = awq_scales(x_mean, alpha, w_mean)  # [in]
        w_hats = [w if spec is None else quantize(w * s, spec) / s for w, spec in zip(weights, specs)]
        loss = float(loss_fn(w_hats))
        history.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    if best[2] is None:  # every loss was nan: keep the weights unscaled
        return torch.ones_like(x_mean, dtype=torch.float32), 0.0, math.nan, history
    return best[2], best[1], best[0], history


def _fake_rows(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize each row of ``w [rows, group]`` as one group."""
    s, z = compute_qparams(w, spec)
    return fake_quantize(w, s.unsqueeze(1), z.unsqueeze(1), spec.maxq)


def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5,
                row_batch: int = 1024) -> torch.Tensor:
    """Per (output row, group) clipping bound minimising the group's output error (llm-awq's auto-clip).

    ``w [out, in]``, ``x [tokens, in]``; returns ``max_val [out, n_groups]``: clip ``w`` to
    ``[-max_val, max_val]`` before quantizing.  Step ``i`` tries ``max|w_group| * (1 - i / n_grid)``
    for ``i < max_shrink * n_grid``; ``i = 0`` (no clipping) is always a candidate.  The error
    of a group, ``mean_t (x_t . (q - w))^2``, is computed as ``(q - w) G (q - w)^T / tokens`` with
    the group's Gram matrix ``G = X^T X``: ``out * in * group`` per step instead of ``tokens * out * in``.
    """
    out_f, in_f = w.shape
    gs = spec.groups_for(in_f)
    ng = in_f // gs
    xg = x.float().reshape(-1, ng, gs).transpose(0, 1)  # [tokens, in] -> [ng, tokens, gs]
    gram = torch.bmm(xg.transpose(1, 2), xg) / xg.shape[1]  # [ng, gs, gs]
    best_all = []
    for r0 in range(0, out_f, row_batch):
        wg = w[r0:r0 + row_batch].float().reshape(-1, ng, gs).transpose(0, 1)  # [ng, rows, gs]
        org_max = wg.abs().amax(dim=-1)  # [ng, rows]
        best = org_max.clone()
        min_err = torch.full_like(org_max, math.inf)
        for i in range(max(1, int(max_shrink * n_grid))):
            mv = org_max * (1 - i / n_grid)
            cw = torch.maximum(torch.minimum(wg, mv.unsqueeze(-1)), -mv.unsqueeze(-1))
            d = _fake_rows(cw.reshape(-1, gs), spec).reshape(cw.shape) - wg  # [ng, rows, gs]
            err = (torch.bmm(d, gram) * d).sum(-1)  # [ng, rows]
            better = err < min_err
            min_err[better] = err[better]
            best[better] = mv[better]
        best_all.append(best.transpose(0, 1))  # [rows, ng]
    return torch.cat(best_all, dim=0)


# ---- plugging it into the block-wise driver -------------------------------------------------------
def _take_rows(obj, rows: torch.Tensor, batch: int):
    """``obj`` (tensors, tuples, dicts of them) with the batch dimension restricted to ``rows``."""
    if isinstance(obj, torch.Tensor):  # [batch, seq, ...] tensors only (cache positions are 1-D)
        return obj[rows] if obj.dim() > 1 and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take_rows(o, rows, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: _take_rows(v, rows, batch) for k, v in obj.items()}
    return obj


def _search_rows(inputs: list, search_tokens: int) -> list[torch.Tensor | None]:
    """Per calibration batch, the sequences the alpha search runs on (evenly spread; ``None`` = skip batch)."""
    sizes = [h.shape[0] for h, _ in inputs]
    total = sum(sizes)
    seqlen = inputs[0][0].shape[1]
    n = total if search_tokens == 0 else min(total, max(1, math.ceil(search_tokens / seqlen)))
    chosen = set(torch.linspace(0, total - 1, n).round().long().tolist())
    out, start = [], 0
    for b in sizes:
        rows = [r - start for r in range(start, start + b) if r in chosen]
        out.append(torch.tensor(rows, dtype=torch.long) if rows else None)
        start += b
    return out


def _run(mod, args, kwargs) -> torch.Tensor:
    out = mod(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _Captured:
    """What one calibration pass over a block records for AWQ: activation statistics of every
    group over all calibration tokens (via ``ctx.collect``), inputs of each inspected module for
    the alpha search, and a strided sample of every group's input tokens for the clip search.

    Search inputs: a module called with the hidden states alone (an MLP, a linear) works token
    by token, so it gets ``search_tokens`` tokens strided over the whole calibration set; one
    called with more (attention: positions, masks) gets whole sequences, spread evenly, of
    about ``search_tokens`` tokens in total."""

    def __init__(self, ctx: BlockContext, groups: tuple[LinearGroup, ...], cfg: AWQConfig):
        self.inspect = {id(g): _inspected(g) for g in groups}
        names = sorted({n for g in groups for n in self.inspect[id(g)]})
        rows = _search_rows(ctx.inputs, cfg.search_tokens)
        total_tokens = sum(h.shape[0] * h.shape[1] for h, _ in ctx.inputs)
        search_stride = 1 if cfg.search_tokens == 0 else max(1, total_tokens // cfg.search_tokens)
        clip_stride = max(1, total_tokens // cfg.clip_tokens)
        self.calls: dict[str, list] = {n: [] for n in names}  # module -> [(args, kwargs)]
        tokens: dict[str, list] = {}  # token-wise module -> [x [tokens, d]]
        self.clip_x: dict[str, list] = {g.linears[0]: [] for g in groups}  # first linear -> [x [tokens, in]]
        state = {"batch": -1}
        handles = [ctx.block.register_forward_pre_hook(lambda m, a: state.__setitem__("batch", state["batch"] + 1))]

        def grab(name):
            def hook(mod, args, kwargs):
                if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):  # token-wise
                    x = args[0].detach()
                    tokens.setdefault(name, []).append(x.reshape(-1, x.shape[-1])[::search_stride].clone())  # not a view: frees the batch
                    return
                r = rows[state["batch"]]
                if r is not None:
                    b = ctx.inputs[state["batch"]][0].shape[0]
                    self.calls[name].append((_take_rows(_detach(args), r, b), _take_rows(_detach(kwargs), r, b)))
            return hook

        def sample(name):
            def hook(mod, args):
                x = args[0].detach()
                self.clip_x[name].append(x.reshape(-1, x.shape[-1])[::clip_stride].float().clone())
            return hook

        for n in names:
            handles.append(ctx.module(n).register_forward_pre_hook(grab(n), with_kwargs=True))
        for n in self.clip_x:
            handles.append(ctx.module(n).register_forward_pre_hook(sample(n)))
        try:
            self.stats = ctx.collect("act", groups)
        finally:
            for h in handles:
                h.remove()
        for n, xs in tokens.items():
            x = torch.cat(xs)
            self.calls[n] = [((x[: cfg.search_tokens or None].unsqueeze(0),), {})]  # [1, tokens, d]
        self.clip_x = {n: torch.cat(xs)[: cfg.clip_tokens] for n, xs in self.clip_x.items() if xs}  # none: an expert no token reached
        with torch.no_grad():  # reference outputs of the float block
            self.ref = {n: [_run(ctx.module(n), a, k) for a, k in self.calls[n]] for n in names}

    def group_loss(self, ctx: BlockContext, g: LinearGroup) -> Callable[[list[torch.Tensor]], float]:
        """``loss_fn(w_hats)``: mean squared error of ``g``'s inspected outputs with ``w_hats`` in place."""
        names = self.inspect[id(g)]

        def loss_fn(w_hats):
            for lin, w in zip(g.linears, w_hats):
                ctx.set_weight(lin, w)
            err, n = 0.0, 0
            for name in names:
                mod = ctx.module(name)
                for (a, k), ref in zip(self.calls[name], self.ref[name]):
                    err += float((_run(mod, a, k).float() - ref.float()).pow(2).sum())
                    n += ref.numel()
            return err / max(n, 1)

        return loss_fn


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _inspected(g: LinearGroup) -> tuple[str, ...]:
    """Modules whose outputs measure ``g``'s error: its ``inspect`` module, else its linears."""
    return (g.inspect,) if g.inspect else tuple(g.linears)


def awq_block(ctx: BlockContext, cfg: AWQConfig) -> tuple[list[ScaleResult], list[ClipResult], dict[str, str]]:
    """Search and apply AWQ scales, then clipping, for one block (weights stay float); returns the
    block-relative results and ``{linear: why it was not scaled}``."""
    arch = ctx.arch
    cap = _Captured(ctx, ctx.groups, cfg)
    scales: list[ScaleResult] = []
    skipped: dict[str, str] = {}
    starved = {n: why for g in ctx.groups if (why := ctx.experts.starved(n := g.linears[0], cap.stats[n], floor=1))}
    for n, why in starved.items():  # experts the calibration barely reached: plain round-to-nearest, said by name
        ctx.experts.warn(ctx.full_name(n), why, "not scaled or clipped by AWQ")
    for g in ctx.groups:  # 1. search every group on the float block (sec. 3.2)
        blocker = starved.get(g.linears[0]) or fold_blocker(ctx.block, g, arch.transposed)
        if blocker:
            skipped.update({n: blocker for n in g.linears})
            continue
        specs = [cfg.spec_for(ctx.full_name(n)) for n in g.linears]
        if all(spec is None for spec in specs):  # every linear stays float: nothing to protect
            continue
        originals = [ctx.weight(n) for n in g.linears]
        try:
            s, alpha, loss, _ = search_scale(cap.stats[g.linears[0]].abs_mean, originals, cap.group_loss(ctx, g), specs,
                                             cfg.n_grid, cfg.duo_scaling)
        finally:
            for n, w in zip(g.linears, originals):
                ctx.set_weight(n, w)
        scales.append(ScaleResult(g.prev, g.prev_kind, tuple(g.linears), s, alpha, loss))
    for res in scales:  # 2. fold them (function-preserving)
        fold_scales(ctx.block, res, transposed=arch.transposed, norm_offset=arch.norm_offset)
    clips: list[ClipResult] = []
    if cfg.clip:  # 3. clip search on the scaled weights, with the scaled inputs
        by_linear = {n: r.scales for r in scales for n in r.linears}
        exclude = re.compile(cfg.clip_exclude) if cfg.clip_exclude is not None else None
        for g in ctx.groups:
            if g.linears[0] in starved:
                continue
            x = cap.clip_x[g.linears[0]]
            for n in g.linears:
                spec = cfg.spec_for(ctx.full_name(n))
                if spec is None or (n in arch.qk if exclude is None else exclude.search(n)):  # float, or not measurable
                    continue
                xs = x / by_linear[n] if n in by_linear else x
                max_val = search_clip(ctx.weight(n), xs, spec, cfg.clip_grid, cfg.max_shrink)
                clips.append(ClipResult(n, max_val, spec.groups_for(xs.shape[1])))
        for res in clips:
            apply_clip(ctx.block, res, transposed=arch.transposed)
    return scales, clips, skipped


def _log(ctx: BlockContext, scales, clips, skipped) -> None:
    extra = ctx.result.extra.setdefault("awq", {"scales": [], "clipped": [], "not_scaled": {}})
    extra["scales"] += [{"prev_op": ctx.full_name(r.prev_op), "linears": [ctx.full_name(n) for n in r.linears],
                         "alpha": r.alpha, "loss": r.loss} for r in scales]
    extra["clipped"] += [ctx.full_name(c.module) for c in clips]
    extra["not_scaled"].update({ctx.full_name(n): why for n, why in skipped.items()})


def _note_skipped(ctx: BlockContext, skipped: dict[str, str]) -> None:
    for rec in ctx.result.log:
        for n, why in skipped.items():
            if rec.block == ctx.index and rec.module == ctx.full_name(n) and not rec.note:
                rec.note = f"AWQ: not scaled ({why})"


@register_method("awq", AWQConfig)
class AWQ(BlockMethod):
    """AWQ scales and clipping, then round-to-nearest."""

    folds_scales = True

    def check(self, model, arch):
        check_group_sizes(model, arch, self.config)

    def search_and_apply(self, ctx: BlockContext) -> dict[str, str]:
        """Search, fold and clip (weights stay float); returns ``{linear: why it was not scaled}``."""
        t0 = time.perf_counter()
        scales, clips, skipped = awq_block(ctx, self.config)
        _log(ctx, scales, clips, skipped)
        ctx.result.log.append(LayerRecord(ctx.index, ctx.prefix, time.perf_counter() - t0,
                                          note="" if scales else "AWQ: no group of this block could be scaled"))
        return skipped

    def process_block(self, ctx):
        skipped = self.search_and_apply(ctx)
        quantize_block_linears(ctx, rtn_linear, None, self.config.spec_for, activations=self.config.activations())
        _note_skipped(ctx, skipped)


@dataclass(frozen=True)
class AWQGPTQConfig(AWQConfig):
    input_statistics: ClassVar[bool] = True  # its GPTQ half weighs imatrix-mse grids by diag(H)
    clip: bool = like(AWQConfig, "clip", default=False)  # GPTQ compensates rounding itself; clipping first rarely helps it
    act_order: bool = like(GPTQConfig, "act_order", default=False)
    static_groups: bool = like(GPTQConfig, "static_groups", default=False)
    damp: float = like(GPTQConfig, "damp")
    blocksize: int = like(GPTQConfig, "blocksize")
    true_sequential: bool = like(GPTQConfig, "true_sequential")

    def gptq_config(self) -> GPTQConfig:
        """The GPTQ half of this config: every GPTQConfig field, read from this one."""
        return GPTQConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GPTQConfig)})

    def __post_init__(self):
        super().__post_init__()
        self.gptq_config()  # validates the GPTQ fields


@register_method("awq+gptq", AWQGPTQConfig)
class AWQGPTQ(AWQ):
    """AWQ scales (and optional clipping), then GPTQ on the scaled weights."""

    def process_block(self, ctx):
        skipped = self.search_and_apply(ctx)
        GPTQ(self.config.gptq_config()).process_block(ctx)  # the current config: a bit budget set its formats in prepare
        _note_skipped(ctx, skipped)
