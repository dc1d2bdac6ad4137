"""The block-by-block calibration driver, written once for every method.

1. catch the inputs of block 0 (hidden states and the keyword arguments the model passes its
   blocks: position embeddings, masks) for the calibration batch;
2. for each block: the method asks for statistics (``ctx.collect``), which runs the block with
   hooks on the linears it names, compresses, and writes the compressed weights back;
3. the block is re-run with its compressed weights to produce the next block's inputs.

Only one block's activations are held (in memory by default, in files with
``quantkit.calibrate.offload.DiskActivations``).  A method is a class with ``process_block(ctx)``;
methods that need no data (RTN, magnitude) set ``needs_calibration = False`` and the driver
skips steps 1 and 3.

The driver calls a :class:`BlockHooks` object around each block.  In memory the hooks do
nothing; ``quantkit.checkpoint.streamed`` uses them to load a block's weights from the checkpoint shards
just before it runs, then write its packed tensors and free it, and to resume a killed run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
from typing import Callable, Iterable

import torch
from torch import nn

from quantkit.calibrate.sensitivity import Reprice, plan_bits
from quantkit.core.rotation import rotate_model
from quantkit.core.quant import clipped_scale_note
from quantkit.core.types import CompressionResult, LayerRecord, QuantizedWeight
from quantkit.devices import resolve_device
from quantkit.errors import QuantkitError
from quantkit.models.arch import ArchSpec, LinearGroup, arch_for, get_module, set_module, weight_out_in
from quantkit.models.moe import ExpertCalibration, all_experts, routing_tally, unfuse_experts
from quantkit.core.hessian import HessianAccumulator
from quantkit.core.stats import ActStats


ToModule = Callable[[object, "torch.Tensor | None", torch.dtype], nn.Module]  # (result, bias, dtype) -> module


class BlockMethod:
    """Base of every block-wise method.  Subclasses set ``needs_calibration`` and implement
    :meth:`process_block`; ``config`` is the method's frozen config dataclass."""

    kind = "quantize"
    needs_calibration = True
    # How the method's work reaches the checkpoint, for recipes that chain methods (quantkit.recipe.check_order):
    folds_scales = False  # divides norms / feeding linears by per-channel scales and multiplies every linear of the group, ignored ones too
    swaps_linears = False  # swaps linears for runtime modules during the run: no dense weight is left for a later method to write

    def __init__(self, config):
        self.config = config

    def repricer(self, model: nn.Module, arch: ArchSpec, calib_ids: torch.Tensor, batch_size: int,
                 progress: Callable[[int, int, str], None] | None = None) -> Reprice | None:
        """With a bit budget: what prices the candidate formats better than round-to-nearest on the
        Fisher diagonal (see :func:`quantkit.calibrate.sensitivity.plan_bits`); None: nothing."""
        return None

    @property
    def stores_results(self) -> bool:
        """Whether the checkpoint stores the method's per-linear results (codes, factors...), which
        replace the float weights when it is packed; ``False``: its work lives in the float weights only."""
        return True

    def check(self, model: nn.Module, arch: ArchSpec) -> None:
        """Refuse up front what cannot be done (a group size that does not divide a layer...)."""

    @classmethod
    def calibrates(cls, config) -> bool:
        """Whether a run with ``config`` needs calibration data: the method's own need, a bit
        budget's (``target_bpw``: each linear's sensitivity is measured on it) or an activation
        clip search's (``act_clip_search``: it runs each block on it)."""
        return cls.needs_calibration or getattr(config, "target_bpw", None) is not None or cls.searches_clips(config)

    @staticmethod
    def searches_clips(config) -> bool:
        """Whether ``config`` asks for each linear's activation clip ratio to be searched (on its block's inputs)."""
        return bool(getattr(config, "act_bits", None) and getattr(config, "act_clip_search", False))

    def prepare(self, model: nn.Module, arch: ArchSpec, result: CompressionResult,
                calib_ids: torch.Tensor | None = None, progress: Callable[[int, int, str], None] | None = None,
                batch_size: int = 8) -> None:
        """Whole-model work before the first block: the residual-stream rotation a config asks for
        (``rotate``; see :mod:`quantkit.core.rotation`), recorded in ``result.extra["rotation"]``;
        then, with a bit budget (``target_bpw``), each linear's format
        (:func:`quantkit.calibrate.sensitivity.plan_bits`; the allocation in ``result.extra["allocation"]``)."""
        if getattr(self.config, "rotate", False):
            result.extra["rotation"] = rotate_model(model, arch, self.config.rotate_seed, self.config.online_hadamard)
        if getattr(self.config, "target_bpw", None) is not None:
            names = [f"{arch.blocks_path}.{i}.{n}" for i, b in enumerate(arch.blocks(model)) for n in arch.linear_names(b)]
            names += [arch.lm_head] if getattr(self.config, "quantize_lm_head", False) else []
            reprice = self.repricer(model, arch, calib_ids, batch_size, progress)
            self.config, result.extra["allocation"] = plan_bits(model, arch, self.config, calib_ids, names,
                                                                self.config.stores_g_idx(), progress, reprice)

    def process_block(self, ctx: "BlockContext") -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self, model: nn.Module, result: CompressionResult) -> None:
        """Called once after the last block."""


class _Caught(Exception):
    pass


class Activations:
    """The hidden states entering the current block, one ``[b, seq, d]`` tensor per calibration
    batch, with the keyword arguments the model passes its blocks (positions, masks), which are
    the same for every block.  Indexing gives ``(hidden, kwargs)``; held in memory."""

    def __init__(self):
        self._hidden: list[torch.Tensor] = []
        self._kwargs: list[dict] = []

    def append(self, hidden: torch.Tensor, kwargs: dict) -> None:
        self._hidden.append(hidden)
        self._kwargs.append(kwargs)

    def __len__(self) -> int:
        return len(self._kwargs)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, dict]:
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        return self._hidden[j], self._kwargs[j]

    def __iter__(self):
        for j in range(len(self)):
            yield self[j]

    def advance(self, run: Callable[[torch.Tensor, dict], torch.Tensor]) -> None:
        """Replace each batch's hidden states by ``run(hidden, kwargs)`` (the block's output)."""
        for j, kwargs in enumerate(self._kwargs):
            self._hidden[j] = run(self._hidden[j], kwargs)


class BlockHooks:
    """What the driver calls around the blocks.  These defaults keep the whole model in memory;
    ``quantkit.checkpoint.streamed.StreamHooks`` loads each block from the checkpoint before it runs and
    writes and frees it after, and resumes after the last block a killed run finished."""

    def first_block(self, n_blocks: int, result: "CompressionResult") -> int:
        """The block to start from (restoring ``result`` for the blocks before it)."""
        return 0

    def activations(self, first: int) -> Activations:
        """An empty store for the calibration inputs of block ``first``."""
        return Activations()

    def load_block(self, index: int, block: nn.Module) -> None:
        """Make block ``index``'s weights real before it runs."""

    def block_done(self, index: int, block: nn.Module, result: "CompressionResult", inputs: Activations | None) -> None:
        """Block ``index`` is compressed and ``inputs`` hold the next block's inputs."""


class BlockContext:
    """What a method sees of one block: its linears, cached inputs and a statistics collector."""

    def __init__(self, index: int, prefix: str, block: nn.Module, arch: ArchSpec,
                 inputs: list | None, result: CompressionResult, batch_device: torch.device,
                 to_module: ToModule | None = None):
        self.index, self.prefix, self.block, self.arch = index, prefix, block, arch
        self.inputs = inputs  # list of (hidden [b, seq, d], kwargs) or None without calibration
        self.result = result
        self.device = batch_device
        self.to_module = to_module
        self._moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original, its copy on self.device)
        self.offload = False  # the block visits self.device from elsewhere: results go back to the CPU
        self.experts = ExpertCalibration()  # MoE: which experts calibrate on what (quantkit.models.moe)

    # -- modules ------------------------------------------------------------------
    @functools.cached_property
    def groups(self) -> tuple[LinearGroup, ...]:
        """The block's groups (an MoE model's dense blocks have no experts), found once."""
        return self.arch.groups_in(self.block)

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def module(self, name: str) -> nn.Module:
        return get_module(self.block, name)

    def weight(self, name: str) -> torch.Tensor:
        """Float32 copy of a linear's weight as ``[out, in]``."""
        return weight_out_in(self.module(name), self.arch.transposed).float().clone()

    def set_weight(self, name: str, w: torch.Tensor) -> None:
        mod = self.module(name)
        w = w.t() if self.arch.transposed else w
        mod.weight.data.copy_(w.to(mod.weight.dtype))

    def replace(self, name: str, result) -> None:
        """Swap a linear for the module holding its compression ``result`` now, so the block's
        next runs go through it (low-rank factors); built by the ``to_module`` the run was given."""
        if self.to_module is None:
            raise RuntimeError("this run builds no modules: pass to_module to run_blockwise")
        old = self.module(name)
        bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
        set_module(self.block, name, self.to_module(result, bias, old.weight.dtype).to(old.weight.device))

    def record(self, name: str, qw, rec: LayerRecord) -> None:
        """Log ``rec`` for linear ``name`` and keep its result ``qw`` (None: left as it was); a grid
        whose scales were clamped at float16's maximum adds its note."""
        full = self.full_name(name)
        rec.module = full
        if qw is not None:
            self.result.quantized[full] = offloaded(qw) if self.offload else qw
        if isinstance(qw, QuantizedWeight):
            rec.note = "; ".join(n for n in (rec.note, clipped_scale_note(qw.scales)) if n)
        self.result.log.append(rec)

    # -- running the block ------------------------------------------------------------
    def run(self, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The block's output for one batch (returned on the device ``hidden`` came from); a
        non-finite output stops the run (every statistic after it would be NaN: GPTQ would fall
        back to RTN on each linear without saying why)."""
        out = self.block(hidden.to(self.device), **{k: self._on_device(v) for k, v in kwargs.items()})
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not torch.isfinite(out).all():
            raise QuantkitError(f"block {self.prefix} computes NaN/Inf activations on the calibration data "
                                "(a broken config value or weight: a norm epsilon, rope_theta...)")
        return out.to(hidden.device)

    def _on_device(self, value):
        """A keyword argument (positions, rotary tables, a mask) on the block's device, each
        tensor copied once per block however many batches share it."""
        if isinstance(value, tuple):
            return tuple(self._on_device(v) for v in value)
        if not isinstance(value, torch.Tensor) or value.device == self.device:
            return value
        hit = self._moved.get(id(value))
        if hit is None or hit[0] is not value:
            hit = self._moved[id(value)] = (value, value.to(self.device))
        return hit[1]

    def forward(self) -> list[torch.Tensor]:
        """Run the block over every cached batch; returns outputs (on the offload device)."""
        return [self.run(hidden, kwargs) for hidden, kwargs in self.inputs]

    def collect(self, kind: str, groups: Iterable[LinearGroup], advance: bool = False) -> dict[str, object]:
        """Run the block once with input hooks on ``groups``' linears and return one accumulator
        per linear name (``kind``: "hessian" -> HessianAccumulator, "act" -> ActStats, or a
        callable ``(group, in_features) -> accumulator`` with ``add(x)``).  Linears of one group
        share their accumulator: their input is the same tensor.  ``advance``: the block's outputs
        replace the cached inputs (for a walk that leaves the weights as they are)."""
        stats: dict[str, object] = {}
        handles = []
        for g in groups:
            first = self.module(g.linears[0])
            in_f = weight_out_in(first, self.arch.transposed).shape[1]
            acc = (kind(g, in_f) if callable(kind) else HessianAccumulator(in_f, self.device) if kind == "hessian"
                   else ActStats(in_f, self.device))
            for name in g.linears:
                stats[name] = acc
            handles.append(first.register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0])))
        try:
            with torch.no_grad(), routing_tally(self.block) as tally, all_experts(self.block, self.experts.all_experts):
                if advance:
                    self.inputs.advance(self.run)
                else:
                    for hidden, kwargs in self.inputs:
                        self.run(hidden, kwargs)  # only the hooks' statistics are kept
        finally:
            for h in handles:
                h.remove()
        for name, counts in tally.items():  # MoE: tokens routed to each expert (one pass over the calibration data)
            self.result.extra.setdefault("expert_tokens", {})[self.full_name(name)] = counts.tolist()
        return stats


def catch_block_inputs(model: nn.Module, arch: ArchSpec, calib_ids: torch.Tensor, batch_size: int,
                       offload: torch.device, store: Activations | None = None) -> Activations:
    """Inputs of block 0 for each calibration batch, appended to ``store``: ``(hidden, kwargs)``.

    Keyword tensors equal to the previous batch's (positions, rotary tables, masks: the same for
    every full batch) are stored once."""
    block0 = arch.blocks(model)[0]
    store = Activations() if store is None else store
    previous: dict = {}

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for k in ("past_key_value", "past_key_values", "layer_past"):
            kwargs.pop(k, None)
        kwargs["use_cache"] = False
        for k, v in kwargs.items():
            if _same_tensors(v, previous.get(k)):
                kwargs[k] = previous[k]
        previous.clear()
        previous.update(kwargs)
        store.append(hidden.detach().to(offload), kwargs)
        raise _Caught

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, calib_ids.shape[0], batch_size):
                batch = calib_ids[start:start + batch_size]
                with contextlib.suppress(_Caught):
                    model(input_ids=batch.to(_input_device(model)), use_cache=False)
    finally:
        handle.remove()
    return store


def _same_tensors(a, b) -> bool:
    """``a`` and ``b`` are equal tensors, or equal tuples of tensors (rotary cos/sin)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and a:
        return all(_same_tensors(x, y) for x, y in zip(a, b))
    return False


def _input_device(model: nn.Module) -> torch.device:
    """Where the model computes: its first tensor that is not on ``meta`` (when streaming, the
    blocks not loaded yet are)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def offloaded(result):
    """A per-linear result (a dataclass of tensors) with its tensors in CPU memory: results wait
    there for the checkpoint while the next block computes on the GPU."""
    if not dataclasses.is_dataclass(result):
        return result
    moved = {f.name: v.cpu() for f in dataclasses.fields(result)
             if isinstance(v := getattr(result, f.name), torch.Tensor) and v.device.type != "cpu"}
    return dataclasses.replace(result, **moved) if moved else result


def run_blockwise(model: nn.Module, method: BlockMethod, calib_ids: torch.Tensor | None = None,
                  batch_size: int = 8, progress: Callable[[int, int, str], None] | None = None,
                  hooks: BlockHooks | None = None, to_module: ToModule | None = None,
                  finish_block: Callable[[nn.Module, CompressionResult, str], object] | None = None,
                  device: torch.device | str | None = None) -> CompressionResult:
    """Compress ``model`` in place, block by block.  ``calib_ids``: ``[nsamples, seqlen]`` token ids.
    ``hooks`` (default: all in memory) load, write and free blocks when streaming.  ``to_module``
    builds the module holding a result, for methods that swap one in during the run
    (:meth:`BlockContext.replace`); ``finish_block(model, result, prefix)`` runs after each block
    (the API passes :func:`quantkit.runtime.swap.pack_finished` there: the finished block's linears
    become packed modules at once).  The driver itself knows no runtime module.

    ``device`` (default: where the model is) is where each block computes: with the model in CPU
    memory and ``device="cuda"``, one block at a time is moved to the GPU, calibrated, compressed
    and moved back (sequential onloading); activations wait in CPU memory between blocks and
    results are kept there."""
    hooks = BlockHooks() if hooks is None else hooks
    unfuse_experts(model)  # MoE: per-expert linears (a no-op once done, and for dense models)
    arch = arch_for(model)
    method.check(model, arch)
    result = CompressionResult()
    method.prepare(model, arch, result, calib_ids, progress, batch_size)
    blocks = arch.blocks(model)
    home = _input_device(model)
    device = home if device is None else resolve_device(device)  # "auto": a GPU when there is one
    onload = device != home
    first = hooks.first_block(len(blocks), result)
    inputs = None
    if (method.needs_calibration or method.searches_clips(method.config)) and first < len(blocks):
        if calib_ids is None:
            raise ValueError(f"method {method.name!r} needs calibration data")
        inputs = catch_block_inputs(model, arch, calib_ids, batch_size, torch.device("cpu"), hooks.activations(first))
    for i in range(first, len(blocks)):
        t0 = time.perf_counter()
        block = blocks[i]
        hooks.load_block(i, block)
        if onload:
            block.to(device)
        ctx = BlockContext(i, f"{arch.blocks_path}.{i}", block, arch, inputs, result, device, to_module)
        ctx.offload = onload
        ctx.experts = ExpertCalibration(bool(getattr(method.config, "all_experts", False)),
                                        int(getattr(method.config, "expert_min_tokens", 0)))
        with torch.no_grad():
            method.process_block(ctx)
            if inputs is not None and i + 1 < len(blocks):
                inputs.advance(ctx.run)
        if onload:
            block.to(home)
        hooks.block_done(i, block, result, inputs)
        if finish_block is not None:
            finish_block(model, result, f"{arch.blocks_path}.{i}.")
        if progress is not None:
            progress(i + 1, len(blocks), f"block {i} {time.perf_counter() - t0:.1f}s")
    method.finish(model, result)
    return result
