"""Mixture-of-experts blocks in a form every method and runtime module can work on.

transformers (5.x) stores a block's experts as 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``; gpt-oss: ``[E, H, 2I]`` with gate and up interleaved, plus biases).
:func:`unfuse_experts` replaces each such module by :class:`Experts`, a list of per-expert
:class:`ExpertMLP` (``gate_proj``, ``up_proj``, ``down_proj``: plain ``nn.Linear``), so GPTQ, AWQ,
RTN, SparseGPT and Wanda see ordinary linears named ``mlp.experts.{e}.gate_proj`` (the names
GPTQModel and vLLM use for quantized experts) and each expert's linears can be swapped for packed
int4/int8 modules.  Its forward has transformers' signature ``(hidden, top_k_index, top_k_weights)``
and loops over the experts the tokens chose (a grouped loop: each active expert runs once on its
tokens), so the routers and blocks of transformers call it unchanged.

Its state dict names each expert's own tensors; a float
checkpoint quantkit writes (after pruning, say) names them as transformers' ``save_pretrained`` does
(:func:`float_checkpoint_state`: Mixtral's ``w1``/``w2``/``w3``, gpt-oss fused), so transformers loads
it; a quantized checkpoint keeps quantkit's per-expert names, which quantkit's loaders read.

Calibration: :func:`routing_tally` counts the tokens routed to each expert while the driver
collects statistics; :func:`all_experts` makes every expert also run on every token (its output
still weighed by the router only where the router chose it), so no expert is quantized blind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models.arch import MoESpec, find_arch, get_module, set_module

log = logging.getLogger("quantkit")


class _Act(nn.Module):
    """``act(gate) * up`` (every family but gpt-oss)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(gate) * up


class _ClampedGLU(nn.Module):
    """gpt-oss: ``(clamp(up) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``."""

    def __init__(self, alpha: float, limit: float):
        super().__init__()
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


class ExpertMLP(nn.Module):
    """One expert: ``down(combine(gate(x), up(x)))``."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, combine: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.combine(self.gate_proj(x), self.up_proj(x)))


class Experts(nn.ModuleList):
    """A block's experts as a list of :class:`ExpertMLP`; called as transformers calls its fused
    experts module.  ``layout``: how transformers stores them fused (``"concat"`` or ``"gpt_oss"``),
    used to save float weights in that form."""

    def __init__(self, experts: list[ExpertMLP], layout: str):
        super().__init__(experts)
        self.layout = layout
        self.tally: torch.Tensor | None = None  # tokens routed to each expert, counted while set
        self.run_all = False  # calibration: every expert also runs on every token

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        flat = top_k_index.reshape(-1)
        if self.tally is not None:
            self.tally += torch.bincount(flat.cpu(), minlength=len(self))[: len(self)]
        weights = top_k_weights.reshape(-1)
        k = top_k_index.shape[-1]
        if hidden.shape[0] == 1 and not self.run_all:  # one token (decoding): its k experts, no sorting
            for j, e in enumerate(flat.tolist()):
                out += (self[e](hidden) * weights[j]).to(out.dtype)  # weighed in the router's precision, as below
            return out
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self)).tolist()
        start = 0
        for e, count in enumerate(counts[: len(self)]):
            chosen = order[start:start + count]
            start += count
            if self.run_all:
                y = self[e](hidden)  # statistics over every token; only the routed rows count below
                y = y[chosen // k]
            elif count == 0:
                continue
            else:
                y = self[e](hidden[chosen // k])
            out.index_add_(0, chosen // k, (y * weights[chosen, None]).to(out.dtype))
        return out

    def _float(self) -> bool:
        """Every expert a plain float linear with its weight (not packed, not compressed by another library)."""
        return all(type(m := getattr(x, n)) is nn.Linear and isinstance(getattr(m, "weight", None), torch.Tensor)
                   for x in self for n in ("gate_proj", "up_proj", "down_proj"))


_FUSED_NAMES = {"concat": ("gate_up_proj", "down_proj"),
                "gpt_oss": ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}


def split(fused: dict[str, torch.Tensor], layout: str, n: int) -> list[dict[str, torch.Tensor]]:
    """Per-expert ``{gate_proj.weight, up_proj.weight, down_proj.weight[, .bias]}`` from the fused tensors."""
    gu, down = fused["gate_up_proj"], fused["down_proj"]
    if gu.shape[0] != n or down.shape[0] != n:
        raise QuantkitError(f"fused experts hold {gu.shape[0]} experts, the module {n}")
    parts = []
    for e in range(n):
        if layout == "concat":  # [2I, H]: gate rows, then up rows; down [H, I]
            gate, up = gu[e].chunk(2, dim=0)
            p = {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down[e]}
        else:  # gpt-oss: [H, 2I] with gate and up interleaved; down [I, H]; biases
            p = {"gate_proj.weight": gu[e][:, ::2].t(), "up_proj.weight": gu[e][:, 1::2].t(), "down_proj.weight": down[e].t(),
                 "gate_proj.bias": fused["gate_up_proj_bias"][e][::2], "up_proj.bias": fused["gate_up_proj_bias"][e][1::2],
                 "down_proj.bias": fused["down_proj_bias"][e]}
        parts.append({k: v.contiguous() for k, v in p.items()})
    return parts


def fuse(experts: Experts) -> dict[str, torch.Tensor]:
    """The float experts' weights in transformers' fused layout (the inverse of :func:`split`)."""
    g = [x.gate_proj for x in experts]
    u = [x.up_proj for x in experts]
    d = [x.down_proj for x in experts]
    if experts.layout == "concat":
        return {"gate_up_proj": torch.stack([torch.cat([a.weight, b.weight]) for a, b in zip(g, u)]),
                "down_proj": torch.stack([m.weight for m in d])}
    gu = torch.stack([torch.stack([a.weight.t(), b.weight.t()], dim=-1).flatten(-2) for a, b in zip(g, u)])
    gub = torch.stack([torch.stack([a.bias, b.bias], dim=-1).flatten() for a, b in zip(g, u)])
    return {"gate_up_proj": gu, "gate_up_proj_bias": gub, "down_proj": torch.stack([m.weight.t() for m in d]),
            "down_proj_bias": torch.stack([m.bias for m in d])}


def _combine(fused: nn.Module, layout: str) -> nn.Module:
    if layout == "gpt_oss":
        return _ClampedGLU(fused.alpha, fused.limit)
    act = getattr(fused, "act_fn", None)
    if act is None:
        raise QuantkitError(f"{type(fused).__name__} has no act_fn: quantkit cannot unfuse its experts")
    return _Act(act)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    lin.weight.requires_grad_(False)
    if not weight.is_meta:
        lin.weight.data.copy_(weight)
    if bias is not None:
        lin.bias.requires_grad_(False)
        if not bias.is_meta:
            lin.bias.data.copy_(bias)
    return lin


def unfused(fused: nn.Module, layout: str) -> Experts:
    """An :class:`Experts` holding the same weights as transformers' fused experts module."""
    tensors = {n: getattr(fused, n) for n in _FUSED_NAMES[layout]}
    n = tensors["gate_up_proj"].shape[0]
    combine = _combine(fused, layout)
    experts = []
    for parts in split({k: v.detach() for k, v in tensors.items()}, layout, n):
        lins = {m: _linear(parts[f"{m}.weight"], parts.get(f"{m}.bias")) for m in ("gate_proj", "up_proj", "down_proj")}
        experts.append(ExpertMLP(lins["gate_proj"], lins["up_proj"], lins["down_proj"], combine))
    return Experts(experts, layout)


def moe_spec(model: nn.Module) -> MoESpec | None:
    """The MoE part of ``model``'s architecture table entry (None: a dense model or one not in the table)."""
    spec = find_arch(getattr(getattr(model, "config", None), "model_type", None))
    return spec.moe if spec is not None else None


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of an MoE ``model`` (in place) by an :class:`Experts`;
    returns how many were replaced (0 for a dense model or one already unfused)."""
    moe = moe_spec(model)
    if moe is None:
        return 0
    spec = find_arch(model.config.model_type)
    done = 0
    owner, _, leaf = moe.experts.rpartition(".")
    for block in spec.blocks(model):
        fused = getattr(get_module(block, owner), leaf, None)
        if fused is None or isinstance(fused, Experts):  # a dense block (arch_for says so), or done
            continue
        if not hasattr(fused, "gate_up_proj"):
            raise QuantkitError(f"{type(fused).__name__} at '{moe.experts}' is not a fused experts module quantkit knows")
        set_module(block, moe.experts, unfused(fused, moe.layout))
        done += 1
    return done


def experts_of(block: nn.Module) -> dict[str, Experts]:
    """The :class:`Experts` modules of a block, by name relative to it."""
    return {name: m for name, m in block.named_modules() if isinstance(m, Experts)}


@contextlib.contextmanager
def routing_tally(block: nn.Module):
    """Count the tokens each expert of ``block`` is routed (``{name: tensor of counts}``, filled as the block runs)."""
    found = experts_of(block)
    counts = {name: torch.zeros(len(m), dtype=torch.long) for name, m in found.items()}
    for name, m in found.items():
        m.tally = counts[name]
    try:
        yield counts
    finally:
        for m in found.values():
            m.tally = None


@contextlib.contextmanager
def all_experts(block: nn.Module, on: bool = True):
    """While inside, every expert of ``block`` also runs on every token (statistics for all experts;
    the block's output is unchanged)."""
    found = list(experts_of(block).values())
    for m in found:
        m.run_all = on
    try:
        yield
    finally:
        for m in found:
            m.run_all = False


@dataclass
class ExpertCalibration:
    """How a run calibrates experts: ``all_experts`` (every expert sees every token) and the
    fewest routed tokens an expert may calibrate on (``min_tokens``; fewer: it falls back)."""

    all_experts: bool = False
    min_tokens: int = 0
    warned: set = field(default_factory=set)

    def starved(self, name: str, stats, floor: int = 0) -> str:
        """Why linear ``name``'s statistics (an accumulator counting its tokens in ``n``) are too few
        to calibrate on (an expert the calibration tokens barely reached), or "" when they suffice;
        ``floor``: the fewest the caller can work with whatever ``min_tokens`` says (AWQ: 1)."""
        least = max(self.min_tokens, floor)
        if stats is None or ".experts." not in f".{name}" or self.all_experts:
            return ""
        n = int(getattr(stats, "n", least))
        if n >= least:
            return ""
        return f"expert routed {n} calibration token(s) (< {least}; --all-experts calibrates it on every token)"

    def warn(self, full_name: str, why: str, action: str) -> None:
        """Log, once per expert, that linear ``full_name``'s expert falls back (``action``) and why."""
        expert = full_name.rsplit(".", 1)[0]
        if expert not in self.warned:
            self.warned.add(expert)
            log.warning("%s: %s: %s", expert, why, action)


_EXPERT_TENSOR = re.compile(r"^(.*\.experts)\.\d+\.(?:gate|up|down)_proj\.(?:weight|bias)$")


def renamer(rules: tuple[tuple[str, str], ...]) -> Callable[[str], str]:
    """A name with every ``(regex, replacement)`` of ``rules`` applied in turn (the table's ``stored_names``/``saved_names``)."""
    compiled = [(re.compile(a), b) for a, b in rules]
    return lambda name: functools.reduce(lambda n, r: r[0].sub(r[1], n), compiled, name)


def checkpoint_names(model: nn.Module) -> Callable[[str], str]:
    """A float checkpoint's name for each model tensor: as transformers writes it (the table's
    ``saved_names``: Mixtral's ``block_sparse_moe.experts.{e}.w1``...); the identity for other models."""
    moe = moe_spec(model)
    return renamer(moe.saved_names if moe is not None else ())


def float_checkpoint_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float checkpoint's tensors (``state``, by model name, in order) as transformers writes
    them: renamed by :func:`checkpoint_names`, and the experts of a family it stores fused (gpt-oss) fused."""
    if moe_spec(model) is None:
        return state
    rename = checkpoint_names(model)
    fused = {n for n, m in model.named_modules() if isinstance(m, Experts) and m.layout != "concat" and m._float()}
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        owner = m.group(1) if (m := _EXPERT_TENSOR.match(name)) else None
        if owner in fused:
            if f"{owner}.gate_up_proj" not in out:
                out.update({f"{owner}.{n}": v for n, v in fuse(get_module(model, owner)).items()})
            continue
        out[rename(name)] = t
    return out
