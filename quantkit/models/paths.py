"""What a model path is, decided once: a Hugging Face directory, a ``.gguf`` file (or a directory
holding one), a hub id (online users), and whether its config declares a quantized format; plus
the small parsing rules every loader shares (dtype names, one-line errors).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

QUANT_METHOD = "quantkit"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise QuantkitError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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


def resolve_model_path(path: str) -> tuple[str, dict]:
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
    if HUB_ID.match(path) and not path.startswith((".", "/")):
        return path, {}  # a hub id: transformers downloads it when online
    raise QuantkitError(f"model path {path!r} does not exist")


def check_weights_format(directory: str, allow_pickle: bool) -> dict:
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


def one_line(e: Exception) -> str:
    msg = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(msg) > 1 and msg[0].endswith(":"):  # "Validation error for field 'x':" + the reason below it
        msg = [f"{msg[0]} {msg[1]}"]
    return (msg[0] if msg else type(e).__name__)[:300]
