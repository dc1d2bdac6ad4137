"""Loading models and tokenizers: a local Hugging Face directory, a hub id (online users) or a
``.gguf`` file (transformers' GGUF loader).  Quantized checkpoints (quantkit's packed format,
GPTQ, AWQ) are read by the loaders :mod:`quantkit.checkpoint.formats` passes in: use its
``load_model`` for any path.

    >>> model, tok = load_model("path/to/model")          # a float checkpoint
    >>> model, tok = load_model("SmolLM2-135M-Instruct.Q4_1.gguf")

Every failure a user can cause becomes a one-line :class:`QuantkitError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models.config import check_config
from quantkit.models.moe import unfuse_experts
from quantkit.models.paths import (check_weights_format, hub_failure, one_line, parse_dtype, quiet_transformers,
                                   read_quantization_config, resolve_model_path)
from quantkit.models.skeleton import model_from_config, preflight




def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    directory, extra = resolve_model_path(path)
    extra.pop("use_safetensors", None)
    try:
        tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, **extra)
        if "gguf_file" in extra:
            restore_gguf_pre_tokenizer(tok, gguf_string(Path(directory) / extra["gguf_file"], "tokenizer.ggml.pre"))
        return tok
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        if directory == path and not os.path.lexists(path):  # resolved as a hub id
            raise hub_failure(path, e) from None
        raise QuantkitError(f"cannot load a tokenizer from {path}: {one_line(e)}") from None


Loader = Callable[[str, torch.dtype], nn.Module]  # (directory, dtype) -> model


def load_model(path: str, dtype=None, device: str = "cpu", *, allow_pickle: bool = False,
               trust_remote_code: bool = False, with_tokenizer: bool = True, quantized: dict[str, Loader] | None = None):
    """``(model, tokenizer)``; model in eval mode on ``device``.  ``quantized`` maps a config's
    ``quantization_config.quant_method`` to the loader of that format.  Whatever a broken or hostile
    checkpoint makes the loaders raise is one :class:`QuantkitError` line."""
    try:
        return _load_model(path, dtype, device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                           with_tokenizer=with_tokenizer, quantized=quantized or {})
    except QuantkitError:
        raise
    except MemoryError:
        raise QuantkitError(f"cannot load {path}: out of memory") from None
    except Exception as e:  # noqa: BLE001 - never a traceback for a bad file
        raise QuantkitError(f"cannot load {path}: {type(e).__name__}: {one_line(e)}") from None


def _load_model(path: str, dtype=None, device: str = "cpu", *, allow_pickle: bool = False,
                trust_remote_code: bool = False, with_tokenizer: bool = True, quantized: dict[str, Loader]):
    quiet_transformers()
    dtype = parse_dtype(dtype)
    directory, extra = resolve_model_path(str(path))
    qcfg = read_quantization_config(directory) if Path(directory).is_dir() else None
    fmt = qcfg.get("quant_method") if qcfg is not None else None
    if fmt in quantized:
        model = quantized[fmt](directory, dtype or torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        extra.update(check_weights_format(directory, allow_pickle))
        if not extra:  # safetensors: config.json checked against the headers before anything is allocated
            preflight(directory, dtype, trust_remote_code)
        kwargs = dict(trust_remote_code=trust_remote_code, **extra)
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            if "gguf_file" in extra:
                model = _load_gguf(directory, extra["gguf_file"], dtype, trust_remote_code)
            else:
                model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, **kwargs)
                model.config.dtype = stored_dtype(directory) or model.config.dtype  # the checkpoint's, whatever --dtype computes in
                if info.get("missing_keys"):  # transformers would run them with random values
                    missing = sorted(info["missing_keys"])
                    raise QuantkitError(f"cannot load {path}: config.json disagrees with the stored weights: {len(missing)} "
                                        f"weight(s) of the model are not stored (e.g. {missing[0]})")
        except OSError as e:
            if not os.path.lexists(directory):  # resolved as a hub id
                raise hub_failure(str(path), e) from None
            raise QuantkitError(f"cannot load {path}: {one_line(e)}") from None
        except (ValueError, KeyError, RuntimeError, TypeError, ImportError) as e:
            msg = one_line(e)
            if "mismatched" in msg or "size mismatch" in msg:
                msg = "config.json disagrees with the shapes of the stored weights"
            raise QuantkitError(f"cannot load {path}: {msg}") from None
        except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError and other format errors
            if type(e).__name__ != "SafetensorError":
                raise
            raise QuantkitError(f"cannot load {path}: corrupt or truncated safetensors file ({one_line(e)})") from None
        check_config(model.config)  # pickle weights and hub ids skip preflight, which checked it already
        unfuse_experts(model)
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
    model.config.dtype = gguf_float_type(path)  # what a checkpoint made from it stores its float tensors in
    return model.to(dtype) if dtype is not None else model


def _smollm_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


# llama.cpp pre-tokenizer names (``tokenizer.ggml.pre``) that transformers' GGUF conversion does not
# rebuild (5.25 leaves their byte-level BPE with a bare ``ByteLevel``), as the original model's
# tokenizers pre-tokenizer: SmolLM's splits every digit off first (ecosystem audit F10)
GGUF_PRE_TOKENIZERS = {"smollm": _smollm_pre_tokenizer}


def restore_gguf_pre_tokenizer(tok, pre: str | None) -> bool:
    """Give a tokenizer transformers rebuilt from a GGUF file the pre-tokenizer the file names, where
    transformers left a bare ``ByteLevel`` for it; True if it did. Then quantkit tokenizes as the
    original model (and llama.cpp on the original file) does, and a checkpoint made from the GGUF
    carries that tokenizer (its GGUF export names the same ``tokenizer.ggml.pre``)."""
    build = GGUF_PRE_TOKENIZERS.get(pre or "")
    backend = getattr(tok, "backend_tokenizer", None)
    if build is None or backend is None:
        return False
    current = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    if current.get("type") != "ByteLevel":
        return False
    backend.pre_tokenizer = build()
    return True


def gguf_string(path: str | Path, key: str) -> str | None:
    """A string field of a GGUF file's metadata, or None."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


GGUF_FLOAT_FILE_TYPES = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}  # general.file_type: ALL_F32, MOSTLY_F16, MOSTLY_BF16


def gguf_float_type(path: str | Path) -> torch.dtype:
    """The float type a GGUF file's metadata names for its weights (``general.file_type``), or
    bfloat16 for a quantized file (Q4_1...), whose float tensors are float32 only after transformers
    dequantizes them."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.file_type")
    file_type = int(field.parts[field.data[0]][0]) if field is not None and field.data else None
    return GGUF_FLOAT_FILE_TYPES.get(file_type, torch.bfloat16)


def stored_dtype(directory: str | Path) -> torch.dtype | None:
    """The float type config.json says the checkpoint's weights are stored in (``dtype``, or
    ``torch_dtype`` in older configs), or None: what quantkit writes back for uncompressed tensors
    (:func:`quantkit.checkpoint.packed.storage_dtype`), so ``--dtype float32`` never widens them."""
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype") if isinstance(cfg, dict) else None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


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
