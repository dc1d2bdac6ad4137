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
failed run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from quantkit.models.arch import arch_for, get_module, set_module
from quantkit.calibrate.driver import CompressionResult
from quantkit.errors import QuantkitError
from quantkit.models.load import QUANT_METHOD, model_from_config

FORMAT = "quantkit-v1"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PackedEntry:
    """A compressed module already swapped into the model as its packed runtime module (or
    already written, when streaming): all that ``quantization_config`` still needs of it."""

    kind: str
    entry: dict

    def config_entry(self) -> dict:
        return dict(self.entry)


def pack_model(model: nn.Module, quantized: dict) -> None:
    """Replace each compressed linear of ``model`` (in place) by its packed runtime module
    (entries already packed are skipped)."""
    for name, qw in quantized.items():
        if isinstance(qw, PackedEntry):
            continue
        lin = get_module(model, name)
        bias = lin.bias.detach() if getattr(lin, "bias", None) is not None else None
        dtype = lin.weight.dtype if lin.weight.dtype.is_floating_point else torch.float32
        set_module(model, name, qw.to_module(bias, dtype))


def pack_finished(model: nn.Module, result: CompressionResult, prefix: str) -> dict:
    """Swap the compressed linears named ``prefix...`` for their packed modules now, and keep
    only their config entries in ``result``: their float weights and unpacked codes are freed
    (what ``compress(..., pack=True)`` does after each block).  Returns the packed entries."""
    mine = {n: q for n, q in result.quantized.items() if n.startswith(prefix) and not isinstance(q, PackedEntry)}
    pack_model(model, mine)
    for n, q in mine.items():
        result.quantized[n] = PackedEntry(q.kind, q.config_entry())
    return mine


def quantization_config(method: str, quantized: dict, defaults: dict, extra: dict | None = None) -> dict:
    cfg = {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "bits": defaults.get("bits"),
        "group_size": defaults.get("group_size"),
        "sym": defaults.get("sym"),
        "desc_act": bool(defaults.get("act_order", False)),
        "modules": {name: qw.config_entry() for name, qw in quantized.items()},
    }
    if extra:
        cfg.update(extra)
    return cfg


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary directory beside ``out``; rename it to ``out`` only if the body succeeds."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise QuantkitError(f"output {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint should read like any directory
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    from quantkit.calibrate.stream import write_safetensors

    out_dir = Path(out_dir)
    state = unique_state_dict(model)
    write_safetensors(out_dir / "model.safetensors", [(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in state.items()],
                      {"format": "pt"})
    save_metadata(model, tokenizer, out_dir, qconfig, result)


def save_metadata(model: nn.Module, tokenizer, out_dir: Path, qconfig: dict | None, result: CompressionResult | None = None) -> None:
    """Everything of a checkpoint but its weights: config.json (+ quantization_config), generation
    config, tokenizer and the module log (quantkit.calibrate.stream writes the weights itself)."""
    out_dir = Path(out_dir)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
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


def _swap_in_runtime_modules(model: nn.Module, modules: dict) -> None:
    from quantkit.runtime.modules import runtime_module_class

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
    for key in ("bits", "group_size", "rank", "n", "m"):
        v = entry.get(key)
        if v is None and key in ("bits", "group_size") and entry.get("kind", "quant") == "quant":
            raise QuantkitError(f"quantization_config.modules[{name!r}] has no {key!r}")
        if v is not None and (type(v) is not int or not -1 <= v <= max(in_f, out_f) or (key == "bits" and not 2 <= v <= 8)
                              or (key == "group_size" and v != -1 and (v < 1 or in_f % v))):
            raise QuantkitError(f"quantization_config.modules[{name!r}].{key} = {v!r} does not fit a {out_f}x{in_f} layer")


def load_packed(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild the model skeleton from config.json, swap in QuantLinear modules and load the weights."""
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
    _swap_in_runtime_modules(model, qcfg.get("modules", {}))
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
    return model


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
