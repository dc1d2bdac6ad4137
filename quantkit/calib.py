"""The block-by-block calibration driver, written once for every method.

1. catch the inputs of block 0 (hidden states and the keyword arguments the model passes its
   blocks: position embeddings, masks) for the calibration batch;
2. for each block: the method asks for statistics (``ctx.collect``), which runs the block with
   hooks on the linears it names, compresses, and writes the compressed weights back;
3. the block is re-run with its compressed weights to produce the next block's inputs.

Only one block's activations are held.  A method is a class with ``process_block(ctx)``;
methods that need no data (RTN, magnitude) set ``needs_calibration = False`` and the driver
skips steps 1 and 3.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from quantkit.arch import ArchSpec, LinearGroup, arch_for, get_module
from quantkit.numerics.hessian import HessianAccumulator
from quantkit.numerics.quant import QuantSpec
from quantkit.numerics.stats import ActStats


@dataclass
class QuantizedWeight:
    """What a quantizing method returns for one linear: unpacked codes and grid (no kernel layout)."""

    q: torch.Tensor  # [out, in] uint8 codes
    scales: torch.Tensor  # [out, n_groups]
    zeros: torch.Tensor  # [out, n_groups] integer-valued
    spec: QuantSpec
    g_idx: torch.Tensor | None = None  # [in] column -> group, act-order only

    kind = "quant"  # the runtime module kind that loads it (see quantkit.runtime.modules)

    def config_entry(self) -> dict:
        """This module's entry in ``quantization_config["modules"]``."""
        return {"kind": self.kind, "bits": self.spec.bits, "group_size": self.spec.group_size, "sym": self.spec.sym,
                "act_order": self.g_idx is not None}

    def to_module(self, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
        """The packed runtime module holding this weight."""
        from quantkit.runtime.qlinear import QuantLinear

        return QuantLinear.from_codes(self.q, self.scales, self.zeros, self.spec.bits, self.spec.group_size, self.spec.sym,
                                      g_idx=self.g_idx, bias=bias, dtype=dtype)


@dataclass
class LayerRecord:
    """One row of the per-module log written beside the checkpoint."""

    block: int
    module: str
    seconds: float
    loss: float | None = None
    damp: float | None = None
    bits: int | None = None
    group_size: int | None = None
    sparsity: float | None = None
    note: str = ""


@dataclass
class CompressionResult:
    # full module name -> compressed weight: any object with .kind, .config_entry() and .to_module(bias, dtype)
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    log: list[LayerRecord] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # method-specific results (scales, masks, ranks...)


class BlockMethod:
    """Base of every block-wise method.  Subclasses set ``needs_calibration`` and implement
    :meth:`process_block`; ``config`` is the method's frozen config dataclass."""

    kind = "quantize"
    needs_calibration = True

    def __init__(self, config):
        self.config = config

    def check(self, model: nn.Module, arch: ArchSpec) -> None:
        """Refuse up front what cannot be done (a group size that does not divide a layer...)."""

    def process_block(self, ctx: "BlockContext") -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self, model: nn.Module, result: CompressionResult) -> None:
        """Called once after the last block."""


class _Caught(Exception):
    pass


def _linear_weight(mod: nn.Module, transposed: bool) -> torch.Tensor:
    w = mod.weight.data
    return w.t() if transposed else w  # always [out, in]


class BlockContext:
    """What a method sees of one block: its linears, cached inputs and a statistics collector."""

    def __init__(self, index: int, prefix: str, block: nn.Module, arch: ArchSpec,
                 inputs: list | None, result: CompressionResult, batch_device: torch.device):
        self.index, self.prefix, self.block, self.arch = index, prefix, block, arch
        self.inputs = inputs  # list of (hidden [b, seq, d], kwargs) or None without calibration
        self.result = result
        self.device = batch_device

    # -- modules ------------------------------------------------------------------
    @property
    def groups(self) -> tuple[LinearGroup, ...]:
        return self.arch.groups

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def module(self, name: str) -> nn.Module:
        return get_module(self.block, name)

    def weight(self, name: str) -> torch.Tensor:
        """Float32 copy of a linear's weight as ``[out, in]``."""
        return _linear_weight(self.module(name), self.arch.transposed).float().clone()

    def set_weight(self, name: str, w: torch.Tensor) -> None:
        mod = self.module(name)
        w = w.t() if self.arch.transposed else w
        mod.weight.data.copy_(w.to(mod.weight.dtype))

    def record(self, name: str, qw: QuantizedWeight | None, rec: LayerRecord) -> None:
        full = self.full_name(name)
        rec.module = full
        if qw is not None:
            self.result.quantized[full] = qw
        self.result.log.append(rec)

    # -- running the block ------------------------------------------------------------
    def forward(self) -> list[torch.Tensor]:
        """Run the block over every cached batch; returns outputs (on the offload device)."""
        outs = []
        for hidden, kwargs in self.inputs:
            out = self.block(hidden.to(self.device), **kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            outs.append(out.to(hidden.device))
        return outs

    def collect(self, kind: str, groups: Iterable[LinearGroup]) -> dict[str, object]:
        """Run the block once with input hooks on ``groups``' linears and return one accumulator
        per linear name (``kind``: "hessian" -> HessianAccumulator, "act" -> ActStats).  Linears
        of one group share their accumulator: their input is the same tensor."""
        stats: dict[str, object] = {}
        handles = []
        for g in groups:
            first = self.module(g.linears[0])
            in_f = _linear_weight(first, self.arch.transposed).shape[1]
            acc = HessianAccumulator(in_f) if kind == "hessian" else ActStats(in_f)
            for name in g.linears:
                stats[name] = acc
            handles.append(first.register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0])))
        try:
            with torch.no_grad():
                self.forward()
        finally:
            for h in handles:
                h.remove()
        return stats


def catch_block_inputs(model: nn.Module, arch: ArchSpec, calib_ids: torch.Tensor, batch_size: int,
                       offload: torch.device) -> list:
    """Inputs of block 0 for each calibration batch: ``[(hidden, kwargs), ...]``."""
    block0 = arch.blocks(model)[0]
    caught = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for k in ("past_key_value", "past_key_values", "layer_past"):
            kwargs.pop(k, None)
        kwargs["use_cache"] = False
        caught.append((hidden.detach().to(offload), kwargs))
        raise _Caught

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, calib_ids.shape[0], batch_size):
                batch = calib_ids[start:start + batch_size]
                with contextlib.suppress(_Caught):
                    model(input_ids=batch.to(model.device), use_cache=False)
    finally:
        handle.remove()
    return caught


def run_blockwise(model: nn.Module, method: BlockMethod, calib_ids: torch.Tensor | None = None,
                  batch_size: int = 8, progress: Callable[[int, int, str], None] | None = None) -> CompressionResult:
    """Compress ``model`` in place, block by block.  ``calib_ids``: ``[nsamples, seqlen]`` token ids."""
    arch = arch_for(model)
    method.check(model, arch)
    blocks = arch.blocks(model)
    result = CompressionResult()
    device = next(model.parameters()).device
    inputs = None
    if method.needs_calibration:
        if calib_ids is None:
            raise ValueError(f"method {method.name!r} needs calibration data")
        inputs = catch_block_inputs(model, arch, calib_ids, batch_size, torch.device("cpu"))
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        ctx = BlockContext(i, f"{arch.blocks_path}.{i}", block, arch, inputs, result, device)
        with torch.no_grad():
            method.process_block(ctx)
            if inputs is not None and i + 1 < len(blocks):
                outs = ctx.forward()
                inputs = [(o, kw) for o, (_, kw) in zip(outs, inputs)]
        if progress is not None:
            progress(i + 1, len(blocks), f"block {i} {time.perf_counter() - t0:.1f}s")
    method.finish(model, result)
    return result


def unlisted_linears(block: nn.Module, arch: ArchSpec) -> list[str]:
    """Linears of a block that the architecture table does not name (reported, never silently skipped)."""
    listed = set(arch.linear_names())
    names = []
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) and name not in listed:
            names.append(name)
    return names
