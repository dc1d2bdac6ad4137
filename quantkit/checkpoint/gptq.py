"""Export to, and import from, the GPTQ checkpoint layout other engines read (transformers'
GPTQ integration, GPTQModel, vLLM, AutoGPTQ), for 2, 4 and 8 bits:

* ``qweight`` int32 ``[in * bits / 32, out]``: codes packed along the input dimension, code of
  input row ``k`` at bits ``(k % (32/bits)) * bits`` of word ``k // (32/bits)``
  (:func:`quantkit.pack.int32.pack_int32`);
* ``qzeros`` int32 ``[n_groups, out * bits / 32]``: zero points packed along the output
  dimension, stored minus one (the ``gptq`` v1 checkpoint format);
* ``scales`` float16 ``[n_groups, out]``; ``g_idx`` int32 ``[in]``;
* ``quantization_config``: ``{"quant_method": "gptq", "bits", "group_size", "desc_act", "sym",
  "checkpoint_format": "gptq"}``.

The v1 format stores ``z - 1``, so a zero point of 0 (an asymmetric group whose minimum is 0)
cannot be written and is exported as 1, as other GPTQ v1 writers do.  Imports of other tools'
layouts share :func:`load_with_quant_linears` (AWQ: :mod:`quantkit.checkpoint.awq`); GGUF export
is :mod:`quantkit.checkpoint.gguf`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantkit.checkpoint.values import check_loaded, check_range
from quantkit.errors import QuantkitError
from quantkit.models.arch import arch_for
from quantkit.pack.int32 import pack_int32, unpack_int32

GPTQ_BITS = (2, 4, 8)


def module_to_gptq(mod) -> dict[str, torch.Tensor]:
    """GPTQ tensors of one :class:`QuantLinear`."""
    if mod.bits not in GPTQ_BITS:
        raise QuantkitError(f"the GPTQ layout packs {GPTQ_BITS} bits into int32; this module has {mod.bits}")
    q = mod.codes()  # [out, in]
    out_f, in_f = q.shape
    per = 32 // mod.bits
    if in_f % per or out_f % per:
        raise QuantkitError(f"the GPTQ layout packs {per} codes per int32 word: a {out_f}x{in_f} layer does not fit "
                            f"(both dimensions must be multiples of {per})")
    zeros = mod.zero_points().round().to(torch.int64)  # [out, G]
    tensors = {
        "qweight": pack_int32(q.t(), mod.bits, 0),  # [in/per, out]
        "qzeros": pack_int32((zeros - 1).clamp(min=0).t(), mod.bits, 1),  # [G, out/per]
        "scales": mod.scales.t().contiguous().to(torch.float16),  # [G, out]
        "g_idx": mod.group_map().to(torch.int32).contiguous(),
    }
    if mod.bias is not None:
        tensors["bias"] = mod.bias.detach().to(torch.float16)
    return tensors


def export_gptq(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a GPTQ-format checkpoint of a quantkit checkpoint whose modules all fit the layout."""
    from safetensors.torch import save_file

    from quantkit.checkpoint.output import atomic_output_dir, check_output
    from quantkit.checkpoint.packed import check_exportable, config_dict, load_packed, unique_state_dict
    from quantkit.models.load import load_model, stored_dtype
    from quantkit.models.paths import QUANT_METHOD, read_quantization_config
    from quantkit.runtime.qlinear import QuantLinear

    check_output(out, overwrite, inputs=(src,))  # before the model is loaded
    qcfg = read_quantization_config(src)
    if not qcfg or qcfg.get("quant_method") != "quantkit":
        raise QuantkitError(f"{src} is not a quantkit packed checkpoint")
    check_exportable(qcfg, src, "the GPTQ format (transformers, GPTQModel, vLLM)")
    model, tok = load_model(str(src), stored_dtype(src), quantized={QUANT_METHOD: load_packed})  # floats keep their type
    formats = {(e["bits"], e["group_size"], e["sym"]) for e in qcfg["modules"].values()}
    other = [n for n, e in qcfg["modules"].items() if e.get("kind", "quant") != "quant"]
    if other:
        raise QuantkitError(f"the GPTQ layout holds only quantized linears; {other[0]} is {qcfg['modules'][other[0]]['kind']}")
    if len(formats) != 1:
        raise QuantkitError(f"the GPTQ layout needs one format for every module; this checkpoint mixes {sorted(formats)}")
    bits, group_size, sym = formats.pop()
    state = {}
    for name, t in unique_state_dict(model).items():
        mod_name, _, leaf = name.rpartition(".")
        if leaf in ("qweight", "scales", "qzeros", "g_idx") or (leaf == "bias" and mod_name in qcfg["modules"]):
            continue
        state[name] = t  # float tensors keep their dtype, so the export computes exactly what the source does
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            for leaf, t in module_to_gptq(mod).items():
                state[f"{name}.{leaf}"] = t.contiguous()
    config = config_dict(model)
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                     "desc_act": any(e.get("act_order") for e in qcfg["modules"].values()),
                                     "sym": sym, "checkpoint_format": "gptq", "true_sequential": True,
                                     "lm_head": arch_for(model).lm_head in qcfg["modules"],  # vLLM and GPTQModel read it
                                     "quantizer": ["quantkit"]}
    with atomic_output_dir(out, overwrite, inputs=(src,)) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(config["quantization_config"], indent=2) + "\n")
        if tok is not None:
            tok.save_pretrained(tmp)
    return Path(out)


def load_with_quant_linears(directory: str | Path, config, build, dtype: torch.dtype = torch.float32):
    """A model from ``config`` whose quantized linears come from another tool's tensors.

    ``build(name, state, dtype)`` pops one linear's tensors (``name.qweight`` and the rest) from
    ``state`` and returns its :class:`QuantLinear`; every other tensor loads as usual."""
    from safetensors.torch import load_file

    from quantkit.models.arch import set_module
    from quantkit.models.skeleton import model_from_config

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise QuantkitError(f"{directory} has a quantization_config but no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = model_from_config(config, dtype)
    prefixes = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight")})
    for name in prefixes:
        try:
            qlin = build(name, state, dtype)
        except KeyError as e:
            raise QuantkitError(f"{directory}: {name} lacks tensor {e}") from None
        set_module(model, name, qlin)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                                                strict=False)
    built = set(prefixes)  # quantized modules were filled from their packed tensors above
    missing = [k for k in missing if not k.endswith("lm_head.weight") and k.rsplit(".", 1)[0] not in built]
    if missing or unexpected:
        raise QuantkitError(f"{directory}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    check_loaded(model, directory, zero_max=None)  # both layouts pack zero points in bits-wide fields: in range
    return model.eval()


def import_gptq(directory: str | Path, dtype: torch.dtype = torch.float32):
    """Load a GPTQ-format checkpoint (ours or another tool's) into quantkit's runtime."""
    from transformers import AutoConfig

    from quantkit.runtime.qlinear import QuantLinear

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    qcfg = dict(config.quantization_config if isinstance(config.quantization_config, dict) else config.quantization_config.to_dict())
    if qcfg.get("quant_method") != "gptq":
        raise QuantkitError(f"{directory} is not a GPTQ checkpoint")
    if qcfg.get("checkpoint_format", "gptq") != "gptq":
        raise QuantkitError(f"GPTQ checkpoint_format {qcfg.get('checkpoint_format')!r} is not supported (only 'gptq')")
    try:
        bits, gs = int(qcfg["bits"]), int(qcfg["group_size"])
    except (KeyError, TypeError, ValueError):
        raise QuantkitError(f"{directory}: GPTQ quantization_config lacks integer bits and group_size") from None
    if bits not in GPTQ_BITS:
        raise QuantkitError(f"GPTQ checkpoints of {bits} bits are not supported (only {GPTQ_BITS})")

    def build(name, state, dtype):
        qweight, qzeros, scales = state.pop(f"{name}.qweight"), state.pop(f"{name}.qzeros"), state.pop(f"{name}.scales")
        g_idx = state.pop(f"{name}.g_idx", None)
        bias = state.pop(f"{name}.bias", None)
        codes = unpack_int32(qweight, bits, 0).t().contiguous()  # [in/per, out] -> [out, in]
        out_f, in_f = codes.shape
        zeros = (unpack_int32(qzeros, bits, 1)[:, :out_f] + 1).t().float()  # [G, out/per] -> [out, G]; v1 stores z - 1
        if bits == 8:  # a stored 255 is zero point 256, which quantkit's uint8 zero points cannot hold
            check_range(directory, f"{name}.qzeros", zeros, 255, "zero point",
                        "an 8-bit grid's zero points lie in 0..255 (GPTQ v1 stores z - 1)")
        group = in_f if gs == -1 else gs
        act = g_idx is not None and not torch.equal(g_idx.to(torch.int32), torch.arange(in_f, dtype=torch.int32) // group)
        return QuantLinear.from_codes(codes.to(torch.uint8), scales.t().float(), zeros, bits, gs, sym=False,
                                      g_idx=g_idx if act else None, bias=bias, dtype=dtype)

    return load_with_quant_linears(directory, config, build, dtype)
