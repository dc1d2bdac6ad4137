"""Export to compressed-tensors, llm-compressor's format, which vLLM and SGLang load on many GPUs.

Written with the ``compressed-tensors`` library itself (an optional dependency:
``pip install 'quantkit[compressed-tensors]'``), not a copy of its layout: each compressed linear
becomes a float carrier holding its exact dequantized weight, the library's quantization scheme
is attached, quantkit's scales and zero points are copied into the parameters the library
creates, and its compressor packs the codes (``weight_packed`` / ``weight``, ``weight_scale``,
``weight_zero_point``) and writes the ``quantization_config``.  The codes come back exactly:
``(q - z) * s / s`` rounds to ``q - z`` (tested bit for bit, and by transformers' reload).

What maps (vLLM kernels: Marlin / Machete for weight-only int4 and int8, CUTLASS int8 for W8A8):

* ``quant`` modules, 4 or 8 bits, per group or per channel, symmetric or asymmetric, static
  activation order (groups stay contiguous): ``pack-quantized`` weight-only ``int`` schemes;
* ``w8a8`` modules (SmoothQuant) with dynamic per-token activations: ``int-quantized``, int8
  per-channel weights and int8 dynamic per-token input activations.

A pruned-then-quantized linear (SparseGPT 2:4 with 4 bits, a prune step before rtn/gptq) is a
``quant`` module whose codes hold the zeros: it exports as any 4-bit grid, the 2:4 pattern intact in
the weights; no sparsity config is written (0.20 has none), so engines run it dense.

Refused by name: other bit widths, an interleaving act-order ``g_idx``, integer activations on a
weight-quantized linear (W4A8/W4A4), a static activation scale, packed N:M sparsity without a grid
(compressed-tensors 0.20 dropped its sparsity configs), low-rank factors and a rotation whose
runtime applies online transforms.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError

ENGINE = "compressed-tensors (vLLM, SGLang)"
WEIGHT_ONLY_BITS = (4, 8)


def _require_library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise QuantkitError("--format compressed-tensors needs the compressed-tensors library: "
                            "pip install 'quantkit[compressed-tensors]'") from None


def _scheme(name: str, mod, entry: dict):
    """``(key, weights args, input args)`` of one module, or a refusal naming why it has no exact form."""
    from compressed_tensors.quantization import QuantizationArgs

    kind = entry.get("kind", "quant")
    if kind == "w8a8":
        if getattr(mod, "act_scale", None) is not None:
            raise QuantkitError(f"{name} quantizes its input with a static scale; compressed-tensors export takes "
                                "dynamic per-token W8A8 (SmoothQuant's default) only")
        w = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        a = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        return ("w8a8", 8, -1, True), w, a
    if kind != "quant":
        why = {"nm_sparse": "packed N:M sparsity (compressed-tensors 0.20 has no sparsity configs)",
               "lowrank": "low-rank factors"}.get(kind, f"a {kind!r} module")
        raise QuantkitError(f"{name} holds {why}, which compressed-tensors cannot hold exactly")
    if mod.bits not in WEIGHT_ONLY_BITS:
        raise QuantkitError(f"{name} is {mod.bits}-bit; compressed-tensors export takes 4- and 8-bit grids "
                            "(what vLLM's kernels run)")
    if mod.g_idx is not None:
        raise QuantkitError(f"{name} uses act-order with a g_idx that interleaves groups; quantize with static groups")
    if mod.act_bits:
        raise QuantkitError(f"{name} quantizes its activations to {mod.act_bits} bits (W{mod.bits}A{mod.act_bits}); "
                            "compressed-tensors export takes weight-only grids and W8A8")
    group = -1 if mod.group_size == mod.in_features else mod.group_size
    w = QuantizationArgs(num_bits=mod.bits, type="int", symmetric=mod.sym, strategy="channel" if group == -1 else "group",
                         group_size=None if group == -1 else group)
    return ("quant", mod.bits, group, mod.sym), w, None


def _carrier(mod) -> tuple[nn.Linear, torch.Tensor, torch.Tensor | None]:
    """A float32 linear holding ``mod``'s exact weight, with the scales and signed zero points the
    library's parameters take (``[out, groups]``; codes ``q - 2^(bits-1)``)."""
    if hasattr(mod, "w_scales"):  # Int8Linear: q int8, W = q * s per output channel
        w, scales, zeros = mod.qweight.float() * mod.w_scales.float()[:, None], mod.w_scales.float()[:, None], None
    else:
        w, scales = mod.dequantized_weight().float(), mod.scales.float()
        zeros = None if mod.sym else mod.zero_points().float() - 2 ** (mod.bits - 1)
    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=torch.float32)
    lin.weight.data = w
    if mod.bias is not None:
        lin.bias.data = mod.bias.detach().float()
    return lin, scales, zeros


def _attach(model: nn.Module, modules: dict) -> dict:
    """Swap every listed module for its carrier, apply the schemes, copy the grids; returns the
    carriers by name (their scales and zeros set)."""
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)

    from quantkit.models.arch import get_module, set_module

    schemes, grids = {}, {}
    for name, entry in modules.items():
        mod = get_module(model, name)
        key, w, a = _scheme(name, mod, entry)
        lin, scales, zeros = _carrier(mod)
        set_module(model, name, lin)
        grids[name] = (scales, zeros)
        schemes.setdefault(key, (w, a, []))[2].append(name)
    groups = {f"group_{i}": QuantizationScheme(targets=names, weights=w, input_activations=a)
              for i, (w, a, names) in enumerate(schemes.values())}
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, quantization_status=QuantizationStatus.FROZEN),
                              show_progress=False)
    for name, (scales, zeros) in grids.items():
        lin = get_module(model, name)
        lin.weight_scale.data.copy_(scales.reshape(lin.weight_scale.shape).to(lin.weight_scale.dtype))
        if zeros is not None:
            lin.weight_zero_point.data.copy_(zeros.reshape(lin.weight_zero_point.shape).to(lin.weight_zero_point.dtype))
    return schemes


def export_compressed_tensors(src: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write ``src`` (a quantkit checkpoint) as a compressed-tensors checkpoint at ``out``
    (atomically); returns ``{"formats": {...}, "modules": n}``."""
    from quantkit.checkpoint.formats import load_model
    from quantkit.checkpoint.output import atomic_output_dir, check_output
    from quantkit.checkpoint.packed import check_exportable, config_dict
    from quantkit.models.load import stored_dtype
    from quantkit.models.paths import read_quantization_config

    _require_library()
    from compressed_tensors.compressors import ModelCompressor

    check_output(out, overwrite, inputs=(src,))
    qcfg = read_quantization_config(src)
    if not qcfg or qcfg.get("quant_method") != "quantkit":
        raise QuantkitError(f"{src} is not a quantkit packed checkpoint")
    check_exportable(qcfg, src, ENGINE)
    model, tok = load_model(str(src), stored_dtype(src))
    schemes = _attach(model, qcfg.get("modules", {}))
    kinds = {k[0] for k in schemes}
    fmt = "pack-quantized" if kinds == {"quant"} else "int-quantized" if kinds == {"w8a8"} else None  # None: per group
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    config = config_dict(model)
    with atomic_output_dir(out, overwrite, inputs=(src,)) as tmp:
        del model.config.quantization_config
        model.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        compressor.update_config(str(tmp))
        if tok is not None:
            tok.save_pretrained(tmp)
    formats = {f"{k[0]} W{k[1]} g{k[2]} {'sym' if k[3] else 'asym'}": len(v[2]) for k, v in schemes.items()}
    return {"formats": formats, "modules": sum(formats.values())}
