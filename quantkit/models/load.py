"""Loading models and tokenizers: a local Hugging Face directory, a hub id (online users), a
``.gguf`` file (transformers' GGUF loader), or a quantkit packed checkpoint.

    >>> model, tok = load_model("path/to/model")          # float or packed, by its config
    >>> model, tok = load_model("SmolLM2-135M-Instruct.Q4_1.gguf")

Every failure a user can cause becomes a one-line :class:`QuantkitError`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError

QUANT_METHOD = "quantkit"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise QuantkitError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:  # older transformers
        pass


def read_quantization_config(path: str | Path) -> dict | None:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantkitError(f"{cfg} is not valid JSON: {e}") from None
    q = data.get("quantization_config")
    return q if isinstance(q, dict) else None


def _resolve(path: str) -> tuple[str, dict]:
    """``(directory or hub id, extra from_pretrained kwargs)``; raises on what cannot be a model."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".gguf":
            return str(p.parent), {"gguf_file": p.name}
        raise QuantkitError(f"{path} is a file but not a .gguf; give a model directory or a .gguf file")
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(p), {"gguf_file": ggufs[0].name}
            raise QuantkitError(f"{path} has no config.json: not a Hugging Face model directory")
        return str(p), {}
    if _HUB_ID.match(path) and not path.startswith((".", "/")):
        return path, {}  # a hub id: transformers downloads it when online
    raise QuantkitError(f"model path {path!r} does not exist")


def _check_weights_format(directory: str, allow_pickle: bool) -> dict:
    p = Path(directory)
    if not p.is_dir():
        return {}
    has_st = any(p.glob("*.safetensors"))
    has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt")) or any(p.glob("*.pth"))
    if not has_st and has_pickle:
        if not allow_pickle:
            raise QuantkitError(f"{directory} holds only pickle weights (.bin/.pt), which can run code when loaded; "
                                "pass --allow-pickle if you trust them")
        return {"use_safetensors": False}
    return {}


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    directory, extra = _resolve(path)
    extra.pop("use_safetensors", None)
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, **extra)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise QuantkitError(f"cannot load a tokenizer from {path}: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    msg = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(msg) > 1 and msg[0].endswith(":"):  # "Validation error for field 'x':" + the reason below it
        msg = [f"{msg[0]} {msg[1]}"]
    return (msg[0] if msg else type(e).__name__)[:300]


def load_model(path: str, dtype=None, device: str = "cpu", *, allow_pickle: bool = False,
               trust_remote_code: bool = False, with_tokenizer: bool = True):
    """``(model, tokenizer)`` for a float or packed checkpoint; model in eval mode on ``device``.
    Whatever a broken or hostile checkpoint makes the loaders raise is one :class:`QuantkitError` line."""
    try:
        return _load_model(path, dtype, device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                           with_tokenizer=with_tokenizer)
    except QuantkitError:
        raise
    except MemoryError:
        raise QuantkitError(f"cannot load {path}: out of memory") from None
    except Exception as e:  # noqa: BLE001 - never a traceback for a bad file
        raise QuantkitError(f"cannot load {path}: {type(e).__name__}: {_one_line(e)}") from None


def _load_model(path: str, dtype=None, device: str = "cpu", *, allow_pickle: bool = False,
                trust_remote_code: bool = False, with_tokenizer: bool = True):
    _quiet_transformers()
    dtype = parse_dtype(dtype)
    directory, extra = _resolve(str(path))
    qcfg = read_quantization_config(directory) if Path(directory).is_dir() else None
    if qcfg is not None and qcfg.get("quant_method") == QUANT_METHOD:
        from quantkit.checkpoint.packed import load_packed

        model = load_packed(directory, dtype=dtype or torch.float32)
    elif qcfg is not None and qcfg.get("quant_method") == "gptq":
        from quantkit.checkpoint.gptq import import_gptq

        model = import_gptq(directory, dtype=dtype or torch.float32)
    elif qcfg is not None and qcfg.get("quant_method") == "awq":
        from quantkit.checkpoint.awq import import_awq

        model = import_awq(directory, dtype=dtype or torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        extra.update(_check_weights_format(directory, allow_pickle))
        if not extra:  # safetensors: config.json checked against the headers before anything is allocated
            from quantkit.calibrate.stream import preflight

            preflight(directory, dtype, trust_remote_code)
        kwargs = dict(trust_remote_code=trust_remote_code, **extra)
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            if "gguf_file" in extra:
                model = _load_gguf(directory, extra["gguf_file"], dtype, trust_remote_code)
            else:
                model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, **kwargs)
                if info.get("missing_keys"):  # transformers would run them with random values
                    missing = sorted(info["missing_keys"])
                    raise QuantkitError(f"cannot load {path}: config.json disagrees with the stored weights: {len(missing)} "
                                        f"weight(s) of the model are not stored (e.g. {missing[0]})")
        except OSError as e:
            raise QuantkitError(f"cannot load {path}: {_one_line(e)}") from None
        except (ValueError, KeyError, RuntimeError, TypeError, ImportError) as e:
            msg = _one_line(e)
            if "mismatched" in msg or "size mismatch" in msg:
                msg = "config.json disagrees with the shapes of the stored weights"
            raise QuantkitError(f"cannot load {path}: {msg}") from None
        except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError and other format errors
            if type(e).__name__ != "SafetensorError":
                raise
            raise QuantkitError(f"cannot load {path}: corrupt or truncated safetensors file ({_one_line(e)})") from None
    model.to(device).eval()
    tok = load_tokenizer(str(path), trust_remote_code) if with_tokenizer else None
    return model, tok


def _load_gguf(directory: str, gguf_file: str, dtype: torch.dtype | None, trust_remote_code: bool) -> nn.Module:
    """A ``.gguf`` file through transformers' GGUF reader, with one copy of the weights in memory.

    ``from_pretrained(gguf_file=...)`` holds the dequantized tensors *and* an initialised model
    (about 2.2x the fp32 model at peak).  Here the model is built without initialisation (its
    untouched storage never becomes resident) and the dequantized tensors are assigned in place.
    """
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(Path(directory) / gguf_file)
    config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    model = model_from_config(config, dtype or torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model, torch_dtype=dtype)["tensors"]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = model.state_dict()
    for name, t in tensors.items():
        if name in expected and tuple(expected[name].shape) != tuple(t.shape):
            raise ValueError(f"size mismatch for {name}: the GGUF holds {tuple(t.shape)}, the config "
                             f"implies {tuple(expected[name].shape)}")
    missing, _ = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise ValueError(f"the GGUF file has no tensor for {missing[0]} ({len(missing)} missing)")
    if tied:
        model.tie_weights()
    return model.to(dtype) if dtype is not None else model


def model_from_config(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM built from ``config`` without spending time on random initialisation
    (its weights are about to be loaded)."""
    import contextlib

    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def model_bytes(model: nn.Module, modules: list[str] | None = None) -> int:
    """Bytes of parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
