"""Pieces every weight-quantizing method shares: the config every method extends, up-front
checks, and the per-linear loop over a block (one-shot or true-sequential)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

import torch

from quantkit.arch import ArchSpec, get_module
from quantkit.calib import BlockContext, LayerRecord, QuantizedWeight, _linear_weight
from quantkit.errors import QuantkitError
from quantkit.numerics.quant import QuantSpec


@dataclass(frozen=True)
class WeightQuantConfig:
    """``bits``/``group_size``/``sym`` for every linear, with optional per-module ``overrides``:
    a tuple of ``(regex, {"bits":..., "group_size":..., "sym":...})`` matched against full module
    names, the last match winning."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    overrides: tuple = ()
    ignore: tuple = ()  # regexes of module names left in float (reported in the log)

    def __post_init__(self):
        QuantSpec(self.bits, self.group_size, self.sym)  # validates
        for pattern in self.ignore:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise QuantkitError(f"bad ignore pattern {pattern!r}: {e}") from None
        for pattern, fields in self.overrides:
            try:
                re.compile(pattern)
            except re.error as e:
                raise QuantkitError(f"bad module pattern {pattern!r}: {e}") from None
            unknown = set(fields) - {"bits", "group_size", "sym"}
            if unknown:
                raise QuantkitError(f"unknown override key(s) {sorted(unknown)} for {pattern!r}")
            self.spec_for_fields(fields)

    def spec_for_fields(self, fields: dict) -> QuantSpec:
        return QuantSpec(fields.get("bits", self.bits), fields.get("group_size", self.group_size), fields.get("sym", self.sym))

    def ignored(self, module_name: str) -> bool:
        return any(re.search(p, module_name) for p in self.ignore)

    def spec_for(self, module_name: str) -> QuantSpec | None:
        """The module's format, or ``None`` if an ``ignore`` pattern matches it."""
        if self.ignored(module_name):
            return None
        spec = QuantSpec(self.bits, self.group_size, self.sym)
        for pattern, fields in self.overrides:
            if re.search(pattern, module_name):
                spec = self.spec_for_fields({**spec.__dict__, **fields})
        return spec


def check_group_sizes(model, arch: ArchSpec, config: WeightQuantConfig) -> None:
    """Refuse, before any work, a group size that does not divide some layer's input features."""
    blocks = arch.blocks(model)
    for i, block in enumerate(blocks):
        for name in arch.linear_names():
            in_f = _linear_weight(get_module(block, name), arch.transposed).shape[1]
            full = f"{arch.blocks_path}.{i}.{name}"
            spec = config.spec_for(full)
            if spec is not None:
                spec.check_layer(full, in_f)


# A per-linear quantizer: (weight [out, in], stats or None, spec) -> (QuantizedWeight, w_hat, loss, damp, note)
LinearQuantizer = Callable[[torch.Tensor, object, QuantSpec], tuple]


def quantize_block_linears(ctx: BlockContext, quantizer: LinearQuantizer, stats_kind: str | None,
                           spec_for: Callable[[str], QuantSpec], true_sequential: bool = False) -> None:
    """Quantize every linear of the block with ``quantizer``, collecting ``stats_kind`` first
    (all groups in one pass, or group by group with ``true_sequential``)."""
    if stats_kind is None or ctx.inputs is None:
        passes = [ctx.groups]
    else:
        passes = [[g] for g in ctx.groups] if true_sequential else [ctx.groups]
    for groups in passes:
        stats = ctx.collect(stats_kind, groups) if stats_kind and ctx.inputs is not None else {}
        for g in groups:
            for name in g.linears:
                t0 = time.perf_counter()
                spec = spec_for(ctx.full_name(name))
                if spec is None:
                    ctx.record(name, None, LayerRecord(ctx.index, name, 0.0, note="ignored: left in float"))
                    continue
                qw, w_hat, loss, damp, note = quantizer(ctx.weight(name), stats.get(name), spec)
                ctx.set_weight(name, w_hat)
                ctx.record(name, qw, LayerRecord(ctx.index, name, time.perf_counter() - t0, loss, damp,
                                                 spec.bits, spec.group_size, note=note))
