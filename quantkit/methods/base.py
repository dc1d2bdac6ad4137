"""Pieces every weight-quantizing method shares: the config every method extends, up-front
checks, and the per-linear loop over a block (one-shot or true-sequential)."""

from __future__ import annotations

import contextlib
import functools
import re
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from quantkit.models.arch import ArchSpec, arch_for, get_module, untie_head, weight_out_in
from quantkit.calibrate.driver import BlockContext
from quantkit.core.types import CompressionResult, LayerRecord, QuantizedWeight
from quantkit.errors import QuantkitError, excerpt
from quantkit.core.budget import TARGET_BPW_RANGE
from quantkit.core.hessian import HessianAccumulator
from quantkit.core.quant import (ACT_DEFAULTS, OBSERVERS, QuantSpec, activation_problem, clipped_scale_note, dequantize,
                                 fake_quantize_tokens, quantize_rtn)
from quantkit.core.stats import ActStats


def rtn_linear(w, _stats, spec: QuantSpec):
    """Round-to-nearest one ``[out, in]`` weight: the per-linear quantizer RTN uses and the
    baseline every calibrated method must beat (same return shape as every quantizer here)."""
    q, s, z = quantize_rtn(w, spec)
    w_hat = dequantize(q, s, z, spec.groups_for(w.shape[1]))
    return QuantizedWeight(q, s, z, spec), w_hat, float((w - w_hat).pow(2).sum()), None, ""


def like(config_cls: type, name: str, **change):
    """``config_cls``'s field ``name`` (default and help) for a config that restates it, with
    ``change`` (e.g. ``default=False``) applied: a config that takes another's option declares
    it as ``act_order: bool = like(GPTQConfig, "act_order", default=False)``."""
    f = config_cls.__dataclass_fields__[name]
    return field(**{"default": f.default, "metadata": f.metadata, **change})


def check_act_bits(act_bits, bits: int, sym: bool) -> None:
    """Integer activations need the weight's integers ``q - z`` in int8: refuse an asymmetric 8-bit grid."""
    if act_bits and bits == 8 and not sym:
        raise QuantkitError("act_bits needs integer weights in int8: an asymmetric 8-bit grid does not fit; use --sym")


def check_target_bpw(target_bpw) -> None:
    """A bit budget is a number of bits per weight within :data:`quantkit.core.budget.TARGET_BPW_RANGE` (or unset)."""
    lo, hi = TARGET_BPW_RANGE
    if target_bpw is not None and (isinstance(target_bpw, bool) or not isinstance(target_bpw, (int, float))
                                   or not lo <= target_bpw <= hi):
        raise QuantkitError(f"target_bpw must be a number of bits per weight from {lo:g} to {hi:g}, got {excerpt(target_bpw)}")


def check_expert_min_tokens(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise QuantkitError(f"expert_min_tokens must be a whole number of tokens >= 0, got {excerpt(n)}")


def check_obs_settings(damp: float, blocksize: int) -> None:
    """The settings GPTQ and SparseGPT share (their OBS-style column loop): damping in (0, 1) and
    a positive lazy-batch block size."""
    if not 0 < damp < 1:
        raise QuantkitError(f"damp must be in (0, 1), got {damp}")
    if blocksize < 1:
        raise QuantkitError(f"blocksize must be positive, got {blocksize}")


def check_module_patterns(ignore, overrides) -> None:
    """Every ``ignore`` regex and every ``overrides`` key compiles (configs call this up front)."""
    for kind, patterns in (("ignore", ignore), ("module", [p for p, _ in overrides])):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise QuantkitError(f"bad {kind} pattern {excerpt(pattern)}: {e}") from None


@dataclass(frozen=True)
class WeightQuantConfig:
    """``bits``/``group_size``/``sym`` for every linear, with optional per-module ``overrides``:
    a tuple of ``(regex, {"bits":..., "group_size":..., "sym":...})`` matched against full module
    names, the last match winning."""

    input_statistics: ClassVar[bool] = False  # the method passes each column's mean squared input to the grids

    bits: int = field(default=4, metadata={"help": "Bits per weight, 2 to 8."})
    group_size: int = field(default=128, metadata={"help": "Input columns per scale; -1 = per channel."})
    sym: bool = field(default=True, metadata={"help": "Symmetric grid (no zero point); --asym: a zero point per group."})
    overrides: tuple = field(default=(), metadata={"help": "Per-module (regex, {bits, group_size, sym}), the last match winning."})
    ignore: tuple = field(default=(), metadata={"help": "Regexes of module names left in float (reported in the log)."})
    rotate: bool = field(default=False, metadata={
        "help": "Rotate the residual stream by a randomized Hadamard matrix first (QuaRot): fewer outliers, "
                "better 2-4 bit grids; the function is unchanged (see `quantkit methods`: rotate)."})
    rotate_seed: int = field(default=0, metadata={"help": "Seed of the rotation's random signs."})
    online_hadamard: bool = field(default=True, metadata={
        "help": "With the rotation, also rotate down_proj's input by a Hadamard transform the runtime applies "
                "(--no-online-hadamard: a plain model other engines run, a little less accurate)."})
    observer: str = field(default="minmax", metadata={
        "choices": OBSERVERS, "help": "How each group's grid is chosen: from its min and max, or (mse) the range, "
                                     "shrunk by up to half, that rounds the group with the least error "
                                     "(imatrix-mse: each column's error weighed by its mean squared input; gptq)."})
    act_bits: int | None = field(default=None, metadata={
        "help": "Also quantize each linear's input per token to 8 or 4 bits at run time (W4A8, W4A4: integer "
                "matmuls); best with --rotate."})
    act_clip: float = field(default=1.0, metadata={
        "help": "With --act-bits: each token's grid spans this fraction of its largest |x| (values beyond it "
                "saturate); below 1 trades a few clipped outliers for finer steps (QuaRot: 0.9 at 4 bits)."})
    act_clip_search: bool = field(default=False, metadata={
        "help": "With --act-bits: choose each linear's clip ratio (0.5 to 1) on the calibration data, the one whose "
                "quantized input changes the linear's output least (--act-clip is then ignored)."})
    act_group_size: int = field(default=-1, metadata={
        "help": "With --act-bits: input columns per activation scale (-1: one scale per token; e.g. 64: one per "
                "token and 64 columns, as MX/NVFP4-style formats; must divide every quantized layer)."})
    act_sym: bool = field(default=True, metadata={
        "help": "With --act-bits: symmetric activation grids; --act-asym: a zero point per token (and group), "
                "which the integer matmul folds in with the weight's column sums."})
    target_bpw: float | None = field(default=None, metadata={
        "help": "Choose each linear's bits (2-8) and group size so the quantized linears take at most this many "
                "bits per weight, scales and zeros included, spending them where the model's loss is most "
                "sensitive (measured on the calibration data; --bits/--group-size are then ignored, "
                "overrides kept); the allocation is written beside the checkpoint."})
    quantize_lm_head: bool = field(default=False, metadata={
        "help": "Quantize lm_head too (untied from the embeddings, which stay float); "
                "GPTQ calibrates it on the final norm's output."})  # see quantize_head
    all_experts: bool = field(default=False, metadata={
        "help": "Mixture-of-experts models: calibrate every expert on every calibration token (its output still "
                "counts only where the router chose it), so no expert is quantized blind."})
    expert_min_tokens: int = field(default=16, metadata={
        "help": "Mixture-of-experts models: an expert routed fewer calibration tokens than this falls back to "
                "round-to-nearest, named in the log (0: never)."})

    def __post_init__(self):
        QuantSpec(self.bits, self.group_size, self.sym, self.observer)  # validates
        if self.observer == "imatrix-mse" and not self.input_statistics:
            raise QuantkitError(f"observer imatrix-mse weighs columns by calibration statistics, which "
                                f"{type(self).__name__.removesuffix('Config').lower()} does not collect: use gptq, or mse")
        problem = activation_problem(**{k: getattr(self, k) for k in ACT_DEFAULTS})
        if problem:
            raise QuantkitError(problem)
        check_act_bits(self.act_bits, self.bits, self.sym)
        if self.act_bits and self.act_group_size != -1 and self.stores_g_idx():
            raise QuantkitError("act_group_size needs contiguous weight groups: act-order without static groups "
                                "interleaves them (drop --no-static-groups, or --act-group-size)")
        check_target_bpw(self.target_bpw)
        check_expert_min_tokens(self.expert_min_tokens)
        check_module_patterns(self.ignore, self.overrides)
        for pattern, fields in self.overrides:
            unknown = set(fields) - {"bits", "group_size", "sym"}
            if unknown:
                raise QuantkitError(f"unknown override key(s) {excerpt(sorted(unknown))} for {excerpt(pattern)}")
            self.spec_for_fields(fields)

    def stores_g_idx(self) -> bool:
        """Whether each quantized linear stores a column -> group map (its bytes count in a bit budget):
        GPTQ's act-order without static groups (the fields of the configs that run GPTQ)."""
        return bool(getattr(self, "act_order", False) and not getattr(self, "static_groups", True))

    def activations(self) -> dict:
        """The run-time activation settings :func:`quantize_block_linears` records on each result
        (``act_clip`` None: searched per linear)."""
        act = {k: getattr(self, k) for k in ACT_DEFAULTS}
        return {**act, "act_clip": None} if self.act_bits and self.act_clip_search else act

    def spec_for_fields(self, fields: dict) -> QuantSpec:
        check_act_bits(self.act_bits, fields.get("bits", self.bits), fields.get("sym", self.sym))
        return QuantSpec(fields.get("bits", self.bits), fields.get("group_size", self.group_size), fields.get("sym", self.sym),
                         self.observer)

    def ignored(self, module_name: str) -> bool:
        return any(re.search(p, module_name) for p in self.ignore)

    def spec_for(self, module_name: str) -> QuantSpec | None:
        """The module's format, or ``None`` if an ``ignore`` pattern matches it."""
        if self.ignored(module_name):
            return None
        spec = QuantSpec(self.bits, self.group_size, self.sym, self.observer)
        for pattern, fields in self._overrides:
            if pattern.search(module_name):
                spec = self.spec_for_fields({**spec.__dict__, **fields})
        return spec

    def sets_format(self, module_name: str) -> bool:
        """Whether an override gives the module its bits or group size (a bit budget leaves it so)."""
        return any(pattern.search(module_name) and {"bits", "group_size"} & set(fields) for pattern, fields in self._overrides)

    @functools.cached_property
    def _overrides(self) -> list:
        """``overrides`` compiled once (a bit budget adds one per linear: more than ``re``'s cache holds)."""
        return [(re.compile(pattern), fields) for pattern, fields in self.overrides]


def check_group_sizes(model, arch: ArchSpec, config: WeightQuantConfig) -> None:
    """Refuse, before any work, a group size that does not divide some layer's input features."""
    blocks = arch.blocks(model)
    budget = getattr(config, "target_bpw", None) is not None  # formats chosen later: only the user's overrides are fixed
    for i, block in enumerate(blocks):
        for name in arch.linear_names(block):
            in_f = weight_out_in(get_module(block, name), arch.transposed).shape[1]
            full = f"{arch.blocks_path}.{i}.{name}"
            problem = activation_problem(**{k: getattr(config, k) for k in ACT_DEFAULTS}, in_features=in_f) if config.act_bits else ""
            if problem and not config.ignored(full):
                raise QuantkitError(f"{full}: {problem}")
            if budget and not config.sets_format(full):
                continue
            spec = config.spec_for(full)
            if spec is not None:
                spec.check_layer(full, in_f)
    if config.quantize_lm_head and (not budget or config.sets_format(arch.lm_head)):
        spec = config.spec_for(arch.lm_head)
        if spec is not None:
            spec.check_layer(arch.lm_head, get_module(model, arch.lm_head).weight.shape[1])


# A per-linear quantizer: (weight [out, in], stats or None, spec) -> (QuantizedWeight, w_hat, loss, damp, note)
LinearQuantizer = Callable[[torch.Tensor, object, QuantSpec], tuple]


def each_linear(ctx: BlockContext, stats_kind: str | None = None, true_sequential: bool = False):
    """Yield ``(name, statistics or None)`` for every linear of the block, in the architecture
    table's order: the one per-linear loop of every method.  ``stats_kind`` (``"hessian"``,
    ``"act"``...) is collected first, for all groups in one pass or, with ``true_sequential``, group
    by group (each group then sees the inputs its compressed predecessors produce)."""
    if stats_kind is None or ctx.inputs is None:
        passes = [ctx.groups]
    else:
        passes = [[g] for g in ctx.groups] if true_sequential else [ctx.groups]
    for groups in passes:
        stats = ctx.collect(stats_kind, groups) if stats_kind and ctx.inputs is not None else {}
        for g in groups:
            for name in g.linears:
                yield name, stats.get(name)


def quantize_block_linears(ctx: BlockContext, quantizer: LinearQuantizer, stats_kind: str | None,
                           spec_for: Callable[[str], QuantSpec], true_sequential: bool = False,
                           activations: dict | None = None) -> None:
    """Quantize every linear of the block with ``quantizer`` (see :func:`each_linear`); with
    ``activations`` (a config's :meth:`WeightQuantConfig.activations`) naming ``act_bits`` the
    results also ask the runtime to quantize the linears' inputs so."""
    act = activations if activations and activations.get("act_bits") else None
    names = []
    for name, stats in each_linear(ctx, stats_kind, true_sequential):
        t0 = time.perf_counter()
        spec = spec_for(ctx.full_name(name))
        if spec is None:
            ctx.record(name, None, LayerRecord(ctx.index, name, 0.0, note="ignored: left in float"))
            continue
        starved = ctx.experts.starved(name, stats)
        if starved:  # an expert the calibration barely reached: round-to-nearest, said by name
            ctx.experts.warn(ctx.full_name(name), starved, "quantized by round-to-nearest")
        qw, w_hat, loss, damp, note = (rtn_linear if starved else quantizer)(ctx.weight(name), stats, spec)
        note = "; ".join(n for n in (note, f"{starved}: RTN" if starved else "") if n)
        if act and isinstance(qw, QuantizedWeight):
            for k, v in act.items():
                setattr(qw, k, float(v) if k == "act_clip" and v is not None else v)
            names.append(name)
        ctx.set_weight(name, w_hat)
        ctx.record(name, qw, LayerRecord(ctx.index, name, time.perf_counter() - t0, loss, damp,
                                         spec.bits, spec.group_size, note=note))
    if act and act["act_clip"] is None and names:
        clips = search_act_clips(ctx, names, act)
        for name in names:
            ctx.result.quantized[ctx.full_name(name)].act_clip = clips[name]


ACT_CLIPS = tuple(round(1 - 0.05 * i, 2) for i in range(11))  # the clip ratios act_clip_search tries: 1, 0.95, ... 0.5


class _ClipErrors:
    """For a group of linears sharing an input: each linear's output error ``||(Q_c(x) - x) W^T||^2``
    for every clip ratio ``c`` of :data:`ACT_CLIPS` (``Q_c``: the run-time activation grid clipped
    at ``c``), over the first ``tokens`` tokens the block sees."""

    def __init__(self, weights: dict[str, torch.Tensor], act: dict, tokens: int):
        self.weights, self.act, self.left = weights, act, tokens
        self.errors = {n: torch.zeros(len(ACT_CLIPS), dtype=torch.float64) for n in weights}

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])[:self.left]  # [tokens, in]
        self.left -= x.shape[0]
        if not x.shape[0]:
            return
        a = self.act
        for i, c in enumerate(ACT_CLIPS):
            e = fake_quantize_tokens(x, a["act_bits"], c, a["act_group_size"], a["act_sym"]) - x  # [tokens, in]
            for n, w in self.weights.items():
                self.errors[n][i] += float((e @ w.t()).pow(2).sum())


def search_act_clips(ctx: BlockContext, names: list[str], act: dict, tokens: int = 2048) -> dict[str, float]:
    """Each of ``names``' activation clip ratio (``act_clip_search``): the one of :data:`ACT_CLIPS`
    whose quantized input changes the linear's output least, its weight quantized, on the block's
    calibration inputs (one more run of the block)."""
    wanted = set(names)
    groups = [g for g in ctx.groups if wanted & set(g.linears)]
    stats = ctx.collect(lambda g, in_f: _ClipErrors({n: ctx.weight(n) for n in g.linears if n in wanted}, act, tokens),
                        groups)
    return {n: ACT_CLIPS[int(torch.argmin(stats[n].errors[n]))] for n in names}


# ---- the output head (quantize_lm_head) --------------------------------------------------------
class _HeadCaught(Exception):
    """Raised by the hook on the head's input: stops the forward before the logits are computed."""


def head_statistics(model: nn.Module, arch: ArchSpec, kind: str, calib_ids: torch.Tensor, batch_size: int):
    """``kind`` statistics ("hessian" or "act") of the head's input -- the final norm's output --
    over the calibration batch, with the (already compressed) blocks in front: the model runs
    up to the head, which is skipped (no logits are computed)."""
    head = get_module(model, arch.lm_head)
    in_f = head.weight.shape[1]
    acc = HessianAccumulator(in_f, head.weight.device) if kind == "hessian" else ActStats(in_f, head.weight.device)

    def hook(module, args):
        acc.add(args[0])
        raise _HeadCaught

    handle = head.register_forward_pre_hook(hook)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, calib_ids.shape[0], batch_size):
                with contextlib.suppress(_HeadCaught):
                    model(input_ids=calib_ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return acc


def quantize_head(model: nn.Module, method, calib_ids: torch.Tensor | None, batch_size: int,
                  result: CompressionResult) -> None:
    """Quantize the output head after the blocks, with the method's own per-linear quantizer
    when it has one (``method.head_quantizer() -> (quantizer, stats_kind)``: GPTQ on the
    Hessian of the final norm's output), else round-to-nearest with a note in the log.

    The head is untied from the input embedding first; the embedding stays float.  Its row in
    the log has ``block = -1``."""
    t0 = time.perf_counter()
    arch = arch_for(model)
    spec = method.config.spec_for(arch.lm_head)
    if spec is None:
        result.log.append(LayerRecord(-1, arch.lm_head, 0.0, note="ignored: left in float"))
        return
    note = ""
    if hasattr(method, "head_quantizer"):
        quantizer, kind = method.head_quantizer()
    else:
        quantizer, kind = rtn_linear, None
        note = f"{method.name} has no lm_head rule: round-to-nearest"
    stats = None
    if kind is not None:
        if calib_ids is None:
            raise QuantkitError(f"quantizing {arch.lm_head} with {method.name} needs calibration data")
        stats = head_statistics(model, arch, kind, calib_ids, batch_size)
    tied = untie_head(model, arch)
    head = get_module(model, arch.lm_head)
    qw, w_hat, loss, damp, qnote = quantizer(head.weight.detach().float().clone(), stats, spec)
    head.weight.data.copy_(w_hat.to(head.weight.dtype))
    result.quantized[arch.lm_head] = qw
    notes = [n for n in (note, qnote, clipped_scale_note(qw.scales) if isinstance(qw, QuantizedWeight) else "",
                         "untied from the input embedding (which stays float)" if tied else "") if n]
    result.log.append(LayerRecord(-1, arch.lm_head, time.perf_counter() - t0, loss, damp, spec.bits, spec.group_size,
                                  note="; ".join(notes)))
