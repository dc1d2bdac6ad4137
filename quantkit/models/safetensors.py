"""Safetensors files read and written tensor by tensor, without mmap (the process's memory is what
it allocates): headers checked against the file, the same bytes ``safetensors.torch.save_file``
writes, one tensor in memory at a time.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from quantkit.errors import QuantkitError


_ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
              "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
              "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
              "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# safetensors' dtype enum order: a file lists its tensors by descending dtype, then by name
_ST_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
             "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
MAX_HEADER = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (absolute byte offsets)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _corrupt(path, why: str) -> QuantkitError:
    return QuantkitError(f"cannot load {path}: corrupt or truncated safetensors file ({why})")


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors file, checked against the file: dtype known, shape and byte
    span agreeing, spans inside the file and not overlapping.  A file is read and checked once
    while it is unchanged (same inode, size and mtime): the auto-stream decision, the header
    checks and the resume fingerprint of one run share one read."""
    return dict(_parsed(Path(path))[1])


def raw_header(path: str | Path) -> bytes:
    """The JSON header bytes of a safetensors file, as :func:`read_header` read them."""
    return _parsed(Path(path))[0]


_HEADERS: dict[tuple, tuple[bytes, dict[str, TensorInfo]]] = {}  # (path, inode, size, mtime) -> (raw, infos)
_HEADERS_KEPT = 256


def _parsed(path: Path) -> tuple[bytes, dict[str, TensorInfo]]:
    st = path.stat()
    if time.time_ns() - st.st_mtime_ns < 2_000_000_000:  # modified within the mtime's granularity: no caching
        return _parse_header(path, st.st_size)  # (as git treats "racily clean" files)
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HEADERS:
        if len(_HEADERS) >= _HEADERS_KEPT:
            _HEADERS.pop(next(iter(_HEADERS)))
        _HEADERS[key] = _parse_header(path, st.st_size)
    return _HEADERS[key]


def _parse_header(path: Path, size: int) -> tuple[bytes, dict[str, TensorInfo]]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, "shorter than a header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER):
            raise _corrupt(path, f"header of {n} bytes in a file of {size}")
        raw = f.read(n)
    if len(raw) < n:
        raise _corrupt(path, "shorter than its header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    base, infos = 8 + n, {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(e, dict) and isinstance(e.get("dtype"), str) and e["dtype"] in _ST_DTYPES
                and isinstance(e.get("shape"), list)
                and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                and all(type(d) is int and d >= 0 for d in e["shape"] + e["data_offsets"])):
            raise _corrupt(path, f"bad entry for {name!r}")
        dtype, shape, (a, b) = _ST_DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
        numel = 1
        for d in shape:
            numel *= d
        if not a <= b or b - a != numel * dtype.itemsize or base + b > size:
            raise _corrupt(path, f"{name!r} spans bytes {a}..{b} of {size - base}")
        infos[name] = TensorInfo(path, dtype, shape, base + a, base + b)
    spans = sorted((i.start, i.end) for i in infos.values() if i.end > i.start)
    if any(s < prev_end for (_, prev_end), (s, _) in itertools.pairwise(spans)):
        raise _corrupt(path, "tensors overlap")
    return raw, infos


def read_tensor(info: TensorInfo) -> torch.Tensor:
    buf = torch.empty(info.end - info.start, dtype=torch.uint8)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        got = f.readinto(memoryview(buf.numpy())) if buf.numel() else 0
    if got != buf.numel():
        raise _corrupt(info.file, "ends inside a tensor")
    return buf.view(info.dtype).reshape(info.shape)


# (name, dtype, shape, load): ``load()`` gives the tensor when its bytes are written
Entry = tuple[str, torch.dtype, tuple, Callable[[], torch.Tensor]]


def write_safetensors(path: str | Path, entries: list[Entry], metadata: dict | None = None) -> None:
    """Write a safetensors file loading one tensor at a time, with the bytes
    ``safetensors.torch.save_file`` writes for the same tensors."""
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    entries = sorted(entries, key=lambda e: (-_ST_ORDER.index(_ST_NAMES[e[1]]), e[0]))
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for name, dtype, shape, _ in entries:
        numel = 1
        for d in shape:
            numel *= d
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + numel * dtype.itemsize]}
        offset += numel * dtype.itemsize
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dtype, shape, load in entries:
            t = load()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, declared {dtype} {tuple(shape)}")
            if t.numel():
                f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` to ``path`` atomically (written beside it, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors(tmp, [(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()], {"format": "pt"})
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: read_tensor(i) for k, i in read_header(path).items()}
