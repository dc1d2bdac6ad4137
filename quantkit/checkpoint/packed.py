"""Packed checkpoints: safetensors with quantkit format v1 weights and a ``quantization_config``.

``config.json`` gains::

    "quantization_config": {
        "quant_method": "quantkit", "format": "quantkit-v1", "format_version": 1,
        "method": "gptq", "bits": 4, "group_size": 64, "sym": true, "desc_act": false,
        "modules": {"model.layers.0.self_attn.q_proj": {"bits": 4, "group_size": 64, "sym": true, "act_order": false}, ...}
    }

Each listed module ``m`` is stored as ``m.qweight`` (uint8, codes packed per row), ``m.scales``
(float16 ``[out, n_groups]``), ``m.qzeros`` (uint8, asymmetric only), ``m.g_idx`` (int32,
act-order only) and ``m.bias``.  Everything else (embeddings, norms) stays float, and so does
lm_head unless it was quantized (``quantize_lm_head``): then it is listed like any other module
and, if it was tied to the input embedding, the config says ``tie_word_embeddings: false``.

Writes go to a temporary directory beside the target, renamed into place at the end, so a
failed run never leaves a half-written checkpoint (:mod:`quantkit.checkpoint.output`: the rules for
``-o OUT``, the one place that decides whether an output may be replaced).
"""

from __future__ import annotations

import contextlib
import csv
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from quantkit.checkpoint.values import check_loaded
from quantkit.core.rotation import attach_online
from quantkit.core.types import CompressionResult
from quantkit.errors import QuantkitError
from quantkit.models.safetensors import write_safetensors
from quantkit.models.moe import float_checkpoint_state
from quantkit.runtime.online import use_native_transforms
from quantkit.runtime.swap import swap_in_runtime_modules
from quantkit.models.load import stored_dtype
from quantkit.models.paths import QUANT_METHOD
from quantkit.models.skeleton import model_from_config

FORMAT = "quantkit-v1"
ALLOCATION_FILE = "allocation.json"  # beside a --target-bpw checkpoint: each linear's format, bits and estimated cost
EXPERT_TOKENS_FILE = "expert_tokens.json"  # beside an MoE checkpoint: calibration tokens routed to each expert
FORMAT_VERSION = 3  # the newest this quantkit writes and reads; a checkpoint says the oldest that reads it right:
# 2: a rotation's online transforms or integer activations (act_bits), which version 1 readers would ignore;
# 3: activation grids beyond act_bits (act_clip, act_group_size, act_sym), which version 2 readers would ignore


def quantization_config(method: str, quantized: dict, defaults: dict, extra: dict | None = None) -> dict:
    cfg = {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "format_version": 1,
        "method": method,
        "bits": None if defaults.get("target_bpw") is not None else defaults.get("bits"),  # a budget: each module's own
        "group_size": None if defaults.get("target_bpw") is not None else defaults.get("group_size"),
        "sym": defaults.get("sym"),
        "desc_act": bool(defaults.get("act_order", False)),
        "modules": {name: qw.config_entry() for name, qw in quantized.items()},
    }
    if extra:
        cfg.update(extra)
    if any(k in e for e in cfg["modules"].values() for k in ("act_clip", "act_group_size", "act_sym")):
        cfg["format_version"] = 3
    elif (cfg.get("rotation") or {}).get("online") or any(e.get("act_bits") for e in cfg["modules"].values()):
        cfg["format_version"] = 2
    return cfg


def write_log(path: Path, result: CompressionResult) -> None:
    rows = [asdict(r) for r in result.log]
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def save_checkpoint(model: nn.Module, tokenizer, out_dir: Path, qconfig: dict | None, result: CompressionResult | None = None) -> None:
    """Write weights (safetensors), config.json (+ quantization_config), tokenizer and the module log.
    Tensors are written one at a time (``save_file`` would first copy them all into one buffer),
    with the bytes ``safetensors.torch.save_file`` writes."""
    out_dir = Path(out_dir)
    state = unique_state_dict(model)
    if qconfig is None:  # a float checkpoint: MoE experts named as transformers writes them
        state = float_checkpoint_state(model, state)
    floats = storage_dtype(model)
    compressed = tuple(f"{m}." for m in (qconfig or {}).get("modules", {}))
    entries = []
    for k, v in state.items():
        dtype = stored_as(k, v, floats, compressed)
        entries.append((k, dtype, tuple(v.shape), lambda v=v, dtype=dtype: v.to(dtype)))
    write_safetensors(out_dir / "model.safetensors", entries, {"format": "pt"})
    save_metadata(model, tokenizer, out_dir, qconfig, result)


def stored_as(name: str, t: torch.Tensor, floats: torch.dtype, compressed: tuple[str, ...]) -> torch.dtype:
    """The dtype tensor ``name`` is written in: ``floats`` (:func:`storage_dtype`) for a wider float
    tensor outside the compressed modules (named by the ``compressed`` prefixes, whose scales and
    factors keep their own types), else its own."""
    narrower = t.is_floating_point() and t.dtype.itemsize > floats.itemsize
    return floats if narrower and not name.startswith(compressed) else t.dtype


def storage_dtype(model: nn.Module) -> torch.dtype:
    """The float type a checkpoint stores its uncompressed tensors (embeddings, norms, a float
    head) in: the source checkpoint's own (``config.dtype``, which the loaders keep whatever
    ``--dtype`` computes in; for a GGUF source the float type its metadata names, else bfloat16),
    never wider, as the peers write them (a SmolLM2 W4 checkpoint from its GGUF took 173 MB with
    float32 embeddings); a model built in memory (no dtype in its config) keeps its own."""
    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.dtype if emb is not None and emb.weight.is_floating_point() else torch.float32


def config_dict(model: nn.Module) -> dict:
    """``model.config`` as config.json should hold it in any checkpoint quantkit writes: the
    architecture named (transformers' GGUF reader leaves ``architectures`` empty, which vLLM
    refuses), no machine-specific source path, no stale ``quantization_config``."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)  # the absolute path of the source on the machine that wrote it
    config["dtype"] = str(storage_dtype(model)).removeprefix("torch.")
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    return config


def save_metadata(model: nn.Module, tokenizer, out_dir: Path, qconfig: dict | None, result: CompressionResult | None = None) -> None:
    """Everything of a checkpoint but its weights: config.json (+ quantization_config), generation
    config, tokenizer and the module log (a streamed run writes the weights itself: quantkit.checkpoint.streamed)."""
    out_dir = Path(out_dir)
    config = config_dict(model)
    if qconfig is not None:
        config["quantization_config"] = qconfig
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        with contextlib.suppress(Exception):
            gen.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if result is not None:
        write_log(out_dir / "quant_log.csv", result)
        if "expert_tokens" in result.extra:  # MoE: calibration tokens routed to each expert, per block
            (out_dir / EXPERT_TOKENS_FILE).write_text(json.dumps(result.extra["expert_tokens"], indent=1) + "\n")
        if "allocation" in result.extra:  # --target-bpw: the format each linear got, and why
            (out_dir / ALLOCATION_FILE).write_text(json.dumps(result.extra["allocation"], indent=2) + "\n")


def load_packed(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild the model skeleton from config.json, swap in QuantLinear modules and load the weights
    (then check their values: :func:`quantkit.checkpoint.values.check_loaded`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as st_load
    from transformers import AutoConfig

    directory = Path(directory)
    qcfg = json.loads((directory / "config.json").read_text())["quantization_config"]
    if type(qcfg.get("format_version", 0)) is not int:
        raise QuantkitError(f"{directory}: quantization_config.format_version must be an integer")
    if qcfg.get("format_version", 0) > FORMAT_VERSION:
        raise QuantkitError(f"{directory} uses quantkit format version {qcfg.get('format_version')}; "
                            f"this quantkit reads up to {FORMAT_VERSION}: upgrade quantkit")
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = model_from_config(config, dtype)
    model.config.dtype = stored_dtype(directory) or model.config.dtype  # saved again, its floats keep their type
    swap_in_runtime_modules(model, qcfg.get("modules", {}))
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise QuantkitError(f"{directory} has a quantization_config but no model.safetensors")
    try:
        missing, unexpected = st_load(model, str(weights), strict=False)
    except (SafetensorError, RuntimeError, OSError) as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise QuantkitError(f"cannot read {weights}: {msg}") from None
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise QuantkitError(f"{weights} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    check_loaded(model, directory)
    if qcfg.get("rotation") is not None:
        attach_online(model, qcfg["rotation"])
        use_native_transforms(model)
    return model


def check_exportable(qcfg: dict | None, src, engine: str) -> None:
    """Refuse to export what ``engine`` cannot run: a rotated checkpoint whose runtime applies
    online Hadamard transforms (``quantization_config.rotation.online``)."""
    rotation = (qcfg or {}).get("rotation")
    if rotation is not None and (not isinstance(rotation, dict) or not isinstance(rotation.get("online", {}), dict)):
        raise QuantkitError(f"{src}: quantization_config.rotation must be a mapping with an 'online' mapping")
    online = (rotation or {}).get("online") or {}
    if online:
        raise QuantkitError(f"{src} is rotated with an online Hadamard transform on the input of {len(online)} linears "
                            f"(e.g. {next(iter(online))}), a step {engine} does not run; quantize with "
                            f"--rotate --no-online-hadamard for a checkpoint {engine} can run")


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor (tied embeddings) once, under its first name in
    sorted order, so identical models always serialize to identical bytes."""
    out, seen = {}, {}
    state = model.state_dict()
    for name in sorted(state, key=lambda n: (n.split(".")[0] == "lm_head", n)):  # keep embeddings, drop tied heads
        t = state[name]
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.detach().contiguous().clone() if not t.is_contiguous() else t.detach()
    return out


def _is_tied(model: nn.Module, key: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")
