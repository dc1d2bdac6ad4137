"""Compression results become runtime modules here, and nowhere else.

:data:`BUILDERS` is the one table from result type (:mod:`quantkit.core.types`) to the packed
runtime module holding it; :func:`swap_in_runtime_modules` does the same from a checkpoint's
``quantization_config`` entries (through :mod:`quantkit.runtime.modules`).
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.core.types import CompressionResult, LowRankWeight, NMSparseWeight, PackedEntry, QuantizedWeight, W8A8Weight
from quantkit.core.quant import ACT_DEFAULTS, activation_problem
from quantkit.errors import QuantkitError
from quantkit.models.arch import arch_for, get_module, set_module
from quantkit.runtime.int8 import Int8Linear
from quantkit.runtime.lowrank import LowRankLinear
from quantkit.runtime.modules import runtime_module_class
from quantkit.runtime.qlinear import QuantLinear
from quantkit.runtime.sparse import SparseLinear

BUILDERS = {
    QuantizedWeight: lambda r, bias, dtype: QuantLinear.from_codes(r.q, r.scales, r.zeros, r.spec.bits, r.spec.group_size,
                                                                   r.spec.sym, g_idx=r.g_idx, bias=bias, dtype=dtype,
                                                                   **r.activations()),
    W8A8Weight: lambda r, bias, dtype: Int8Linear.from_quantized(r.q, r.w_scale, r.act_scale, bias, dtype),
    NMSparseWeight: lambda r, bias, dtype: SparseLinear.from_compressed(r.values, r.indices, r.n, r.m, bias=bias, dtype=dtype),
    LowRankWeight: lambda r, bias, dtype: LowRankLinear.from_factors(r.u, r.v, bias=bias, dtype=dtype),
}


def to_module(result, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """The packed runtime module holding one linear's compression ``result`` (a fresh copy)."""
    build = BUILDERS.get(type(result))
    if build is None:
        raise TypeError(f"no runtime module for {type(result).__name__}")
    return build(result, bias, dtype)


def pack_model(model: nn.Module, quantized: dict) -> None:
    """Replace each compressed linear of ``model`` (in place) by its packed runtime module
    (entries already packed are skipped)."""
    for name, qw in quantized.items():
        if isinstance(qw, PackedEntry):
            continue
        lin = get_module(model, name)
        bias = lin.bias.detach() if getattr(lin, "bias", None) is not None else None
        dtype = lin.weight.dtype if lin.weight.dtype.is_floating_point else torch.float32
        set_module(model, name, to_module(qw, bias, dtype).to(lin.weight.device))  # results wait on the CPU


def pack_finished(model: nn.Module, result: CompressionResult, prefix: str) -> dict:
    """Swap the compressed linears named ``prefix...`` for their packed modules now, and keep
    only their config entries in ``result``: their float weights and unpacked codes are freed
    (what ``compress(..., pack=True)`` does after each block).  Returns the packed entries."""
    mine = {n: q for n, q in result.quantized.items() if n.startswith(prefix) and not isinstance(q, PackedEntry)}
    pack_model(model, mine)
    for n, q in mine.items():
        result.quantized[n] = PackedEntry(q.kind, q.config_entry())
    return mine


def swap_in_runtime_modules(model: nn.Module, modules: dict) -> None:
    """Replace each linear a checkpoint's ``quantization_config.modules`` lists by an empty runtime
    module of its ``kind`` (checked against the layer first), ready for the checkpoint's tensors."""
    transposed = arch_for(model).transposed
    if not isinstance(modules, dict):
        raise QuantkitError("quantization_config.modules must be a mapping of module names to entries")
    for name, entry in modules.items():
        lin = get_module(model, name)
        w = getattr(lin, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise QuantkitError(f"quantization_config.modules names {name!r}, which is not a linear layer")
        # GPT-2's Conv1D blocks store [in, out]; its lm_head is a plain nn.Linear
        out_f, in_f = (w.shape[1], w.shape[0]) if transposed and not isinstance(lin, nn.Linear) else tuple(w.shape)
        _check_entry(name, entry, in_f, out_f)
        cls = runtime_module_class(entry.get("kind", "quant"))
        set_module(model, name, cls.from_entry(in_f, out_f, entry, bias=getattr(lin, "bias", None) is not None, dtype=w.dtype))


def _check_entry(name: str, entry, in_f: int, out_f: int) -> None:
    """A module entry's sizes are sane before any buffer is allocated for it (a hostile config
    could otherwise ask for a 10^9-bit grid or a rank larger than the layer)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("kind", "quant"), str):
        raise QuantkitError(f"quantization_config.modules[{name!r}] must be a mapping with a string 'kind'")
    problem = activation_problem(**{k: entry.get(k, d) for k, d in ACT_DEFAULTS.items()}, in_features=in_f)
    if problem:
        raise QuantkitError(f"quantization_config.modules[{name!r}]: {problem}")
    if entry.get("act_bits") and entry.get("act_order") and entry.get("act_group_size", -1) != -1:
        raise QuantkitError(f"quantization_config.modules[{name!r}]: act_group_size needs contiguous weight groups, "
                            "not an act-order g_idx")
    if entry.get("act_bits") and entry.get("bits") == 8 and entry.get("sym") is False:
        raise QuantkitError(f"quantization_config.modules[{name!r}]: act_bits with an asymmetric 8-bit grid does not fit int8")
    for key in ("bits", "group_size", "rank", "n", "m"):
        v = entry.get(key)
        if v is None and key in ("bits", "group_size") and entry.get("kind", "quant") == "quant":
            raise QuantkitError(f"quantization_config.modules[{name!r}] has no {key!r}")
        if v is not None and (type(v) is not int or not -1 <= v <= max(in_f, out_f) or (key == "bits" and not 2 <= v <= 8)
                              or (key == "group_size" and v != -1 and (v < 1 or in_f % v))):
            raise QuantkitError(f"quantization_config.modules[{name!r}].{key} = {v!r} does not fit a {out_f}x{in_f} layer")


