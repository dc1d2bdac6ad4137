"""What a model path is, decided once: a Hugging Face directory, a ``.gguf`` file (or a directory
holding one), a hub id (online users), and whether its config declares a quantized format; plus
the small parsing rules every loader shares (dtype names, one-line errors).
"""

from __future__ import annotations

import json
import os
import re
import stat
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


def file_kind(path: Path) -> str | None:
    """None for a regular file (or a symlink to one), else what ``path`` is, in words: ``missing``,
    ``a directory``, ``a FIFO``, ``a character device (a symlink to /dev/zero)``..."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except FileNotFoundError:
        return "a broken symlink" if os.path.islink(path) else "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"{kind} (a symlink to {os.readlink(path)})" if os.path.islink(path) else kind


MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".gguf")


def check_model_files(directory: str | Path) -> None:
    """Refuse a model directory whose weight or config files are not regular files (a FIFO, a
    device, a symlink to /dev/zero): loaders would block on them or say they are missing."""
    with os.scandir(directory) as entries:
        names = sorted(e.name for e in entries if e.name.endswith(MODEL_FILE_SUFFIXES))
    for name in names:
        kind = file_kind(Path(directory) / name)
        if kind is not None:
            raise QuantkitError(f"cannot load {directory}: {name} is {kind}, not a regular file")


def is_hub_id(path: str) -> bool:
    """Whether a path that does not exist here is taken for a hub id: ``owner/name`` (one ``/``, no
    leading ``.``, ``/`` or ``~``) whose ``owner`` is not a local directory or file (``out/no_such_ckpt``
    with an ``out/`` here is a missing local path)."""
    if not HUB_ID.match(path) or path.startswith((".", "/", "~")):
        return False
    return not os.path.lexists(path.split("/", 1)[0])


def hub_failure(path: str, e: Exception) -> QuantkitError:
    """The error for a hub id that could not be loaded: it is not a local path either."""
    return QuantkitError(f"model path {path!r} does not exist locally; tried as a Hugging Face hub id: {one_line(e)}")


def resolve_model_path(path: str) -> tuple[str, dict]:
    """``(directory or hub id, extra from_pretrained kwargs)``; raises on what cannot be a model."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".gguf":
            return str(p.parent), {"gguf_file": p.name}
        raise QuantkitError(f"{path} is a file but not a .gguf; give a model directory or a .gguf file")
    if p.is_dir():
        check_model_files(p)
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(p), {"gguf_file": ggufs[0].name}
            raise QuantkitError(f"{path} has no config.json: not a Hugging Face model directory")
        return str(p), {}
    if os.path.lexists(p):  # a FIFO, a device, a broken symlink
        raise QuantkitError(f"model path {path!r} is {file_kind(p)}, not a model directory or a .gguf file")
    if is_hub_id(path):
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
