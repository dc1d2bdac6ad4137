"""Quantizing models larger than memory: stream the weights from safetensors one block at a time.

    quantkit quantize MODEL -o OUT --method gptq --stream [--resume] [--offload-activations DIR]

    >>> from quantkit.calibrate.stream import compress_streaming
    >>> result = compress_streaming("Llama-3.2-3B", "out/llama-w4", "rtn", {"bits": 4, "group_size": 128})

The model is built on the ``meta`` device from ``config.json`` and the block-by-block driver
(:func:`quantkit.calibrate.driver.run_blockwise`) runs unchanged with :class:`StreamHooks`, which

* before block ``i``: read only that block's tensors from the shards (plain reads, no mmap: the
  process's memory is what it allocates) and check them (shape, NaN/Inf);
* after block ``i``: pack its compressed linears, write them to the work directory and free the
  block (back to ``meta``).

Calibration hidden states live in files (:class:`DiskActivations`), one batch in memory at a
time.  Peak memory is about one block, its statistics and one batch, not the model.

The work directory ``.OUT.partial`` beside ``OUT`` keeps the finished blocks, the hidden states
feeding the next block and ``manifest.json``, keyed by hashes of the input checkpoint, the method
settings and the calibration data: ``--resume`` continues a killed run from its last finished
block and refuses one whose settings differ.  At the end the checkpoint is assembled tensor by
tensor into the same ``model.safetensors`` the in-memory path writes (byte for byte), in a
temporary directory renamed to ``OUT``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from quantkit.models.arch import ArchSpec, arch_for, get_module
from quantkit.calibrate.driver import Activations, BlockHooks, CompressionResult, LayerRecord
from quantkit.checkpoint.packed import PackedEntry, pack_finished
from quantkit.errors import QuantkitError
from quantkit.memory import release_freed_memory

MANIFEST_VERSION = 1
KILL_AFTER_BLOCK_ENV = "QUANTKIT_TEST_KILL_AFTER_BLOCK"  # fault injection for the kill-and-resume test

# ---- safetensors files, read and written without mmap ---------------------------------------------

_ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
              "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
              "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
              "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# safetensors' dtype enum order: a file lists its tensors by descending dtype, then by name
_ST_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
             "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
_MAX_HEADER = 100_000_000  # safetensors' own limit


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
    span agreeing, spans inside the file and not overlapping."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, "shorter than a header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise _corrupt(path, f"header of {n} bytes in a file of {size}")
        raw = f.read(n)
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
    return infos


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


# ---- the input checkpoint --------------------------------------------------------------------------

def _not_streamable(path, why: str) -> QuantkitError:
    return QuantkitError(f"cannot stream {path}: {why}")


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a float checkpoint directory (``model.safetensors``, else the shards
    its ``model.safetensors.index.json`` names); a clear error for anything --stream cannot read."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise QuantkitError(f"{index} is not a valid safetensors index (JSON with a weight_map)") from None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise QuantkitError(f"{index} has no weight_map of tensor names to shard files")
        files = sorted(set(weight_map.values()))
        for name in files:
            if Path(name).name != name or name in (".", ".."):
                raise QuantkitError(f"{index} names a shard outside its directory: {name!r}")
            if not (directory / name).is_file():
                raise QuantkitError(f"{index} names a shard that is missing: {name}")
        return [directory / name for name in files]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        raise _not_streamable(directory, "its weights are pickle files (.bin/.pt); --stream reads safetensors only "
                                         "(without --stream, --allow-pickle loads them if you trust them)")
    if any(directory.glob("*.safetensors")):
        raise _not_streamable(directory, "it has safetensors files but neither model.safetensors nor model.safetensors.index.json")
    raise QuantkitError(f"{directory} holds no model weights (no model.safetensors)")


class StreamSource:
    """A float safetensors checkpoint opened for streaming: the model skeleton on ``meta`` (only
    buffers such as rotary tables are real), the tensor index of every shard, checked against the
    skeleton before any work, and the tie groups (tied embeddings load once)."""

    def __init__(self, directory: Path, model: nn.Module, arch: ArchSpec, tensors: dict[str, TensorInfo], files: list[Path],
                 dtype: torch.dtype):
        self.directory, self.model, self.arch, self.tensors, self.files, self.dtype = directory, model, arch, tensors, files, dtype
        self.prefix = arch.blocks_path + "."
        self.slots = dict(model.state_dict(keep_vars=True))  # name -> Parameter / buffer (tied ones shared)
        self._group_of = {n: g for g in self.tie_groups() for n in g}
        self._stored_as, self.converted = _stored_names(model, tensors)

    @classmethod
    def open(cls, path: str | Path, dtype=None, trust_remote_code: bool = False) -> "StreamSource":
        from quantkit.models.load import _HUB_ID, read_quantization_config

        p = Path(path)
        if p.is_file() or (p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf"))):
            if p.suffix == ".gguf" or p.is_dir():
                raise _not_streamable(path, "a GGUF file is not stored as safetensors blocks; quantize it without --stream")
            raise QuantkitError(f"{path} is a file but not a .gguf; give a model directory or a .gguf file")
        if not p.exists():
            if _HUB_ID.match(str(path)):
                raise _not_streamable(path, "--stream reads a local directory; download the model first")
            raise QuantkitError(f"model path {str(path)!r} does not exist")
        if not (p / "config.json").is_file():
            raise QuantkitError(f"{path} has no config.json: not a Hugging Face model directory")
        qcfg = read_quantization_config(p)
        if qcfg is not None:
            raise _not_streamable(path, f"it is already quantized ({qcfg.get('quant_method')!r}); --stream reads float checkpoints")
        files = weight_files(p)
        model, tensors, dtype = _skeleton(p, files, dtype, trust_remote_code)
        src = cls(p, model, arch_for(model), tensors, files, dtype)
        if src.converted:
            raise _not_streamable(path, f"transformers converts some of its tensors when loading them (fuses or splits "
                                        f"{src.converted[0]}...); quantize it without --stream")
        src.check_names()
        return src

    # -- names ------------------------------------------------------------------------------
    def checkpoint_name(self, name: str) -> str | None:
        """The checkpoint's name for the model tensor ``name`` (renamed as transformers renames them
        when loading: a base-model prefix, GPT-NeoX's ``embed_out`` for ``lm_head``...)."""
        return self._stored_as.get(name)

    def check_names(self) -> None:
        """Every parameter has a stored tensor of its shape: checked from the headers, before any work."""
        for group in self.tie_groups():
            stored = self.stored_name(group[0])
            slot = self.slots[group[0]]
            if stored is None:
                if isinstance(slot, nn.Parameter):
                    raise QuantkitError(f"cannot load {self.directory}: the checkpoint has no tensor {group[0]} "
                                        "(config.json and the weights disagree)")
                continue  # a buffer the model computes itself
            info = self.tensors[stored]
            if info.shape != tuple(slot.shape):
                raise QuantkitError(f"cannot load {self.directory}: config.json disagrees with the shapes of the stored "
                                    f"weights ({group[0]}: {list(info.shape)} stored, {list(slot.shape)} expected)")

    def tie_groups(self, names: list[str] | None = None) -> list[list[str]]:
        """Names sharing one tensor, grouped; in :func:`quantkit.checkpoint.packed.unique_state_dict`'s order,
        so a group's first name is the one checkpoints store."""
        names = sorted(self.slots if names is None else names, key=lambda n: (n.split(".")[0] == "lm_head", n))
        groups: dict[int, list[str]] = {}
        for n in names:
            groups.setdefault(id(self.slots[n]), []).append(n)
        return list(groups.values())

    def block_names(self, index: int | None = None) -> list[str]:
        pre = self.prefix if index is None else f"{self.prefix}{index}."
        return [n for n in self.slots if n.startswith(pre)]

    def outer_names(self) -> list[str]:
        return [n for n in self.slots if not n.startswith(self.prefix)]

    # -- tensors ----------------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        """The stored tensor for model tensor ``name``, in the skeleton's dtype, checked finite
        (a buffer that is not stored keeps the value the model computed)."""
        stored = self.stored_name(name)
        slot = self.slots[name]
        if stored is None:
            return slot.detach()
        t = read_tensor(self.tensors[stored]).to(slot.dtype)
        bad = _count_nonfinite(t)
        if bad:
            raise QuantkitError(f"{name} holds {bad} NaN/Inf value(s); refusing to compress a broken checkpoint")
        return t

    def materialize(self, names: list[str]) -> None:
        """Load ``names`` from the checkpoint into the skeleton (tied names share the tensor)."""
        for group in self.tie_groups(names):
            self._assign(group, self.read(group[0]))

    def free(self, names: list[str]) -> None:
        """Send ``names`` back to ``meta`` (buffers the checkpoint does not store stay: nothing could reload them)."""
        for group in self.tie_groups(names):
            if self.stored_name(group[0]) is not None:
                self._assign(group, torch.empty_like(self.slots[group[0]], device="meta"))

    def forget(self, names: list[str]) -> None:
        """Drop this object's references to ``names``' tensors (their modules were replaced: packed)."""
        for name in names:
            slot = self.slots[name]
            meta = torch.empty_like(slot, device="meta")
            self.slots[name] = nn.Parameter(meta, requires_grad=False) if isinstance(slot, nn.Parameter) else meta

    def stored_name(self, name: str) -> str | None:
        """The checkpoint name holding ``name``'s tensor (or that of a name tied to it)."""
        return next((c for c in map(self.checkpoint_name, self._group_of[name]) if c is not None), None)

    def _assign(self, group: list[str], t: torch.Tensor) -> None:
        value = nn.Parameter(t, requires_grad=False) if isinstance(self.slots[group[0]], nn.Parameter) else t
        for name in group:
            mod_path, _, leaf = name.rpartition(".")
            mod = get_module(self.model, mod_path) if mod_path else self.model
            if leaf in mod._parameters:
                mod._parameters[leaf] = value
            else:
                mod._buffers[leaf] = value
            self.slots[name] = value

    def nbytes(self) -> int:
        """Bytes of the loaded model (tied tensors once), as :func:`quantkit.models.load.model_bytes` counts them."""
        extra = {b.data_ptr(): b.numel() * b.element_size() for n, b in self.model.named_buffers() if n not in self.slots}
        return sum(self.slots[g[0]].numel() * self.slots[g[0]].element_size() for g in self.tie_groups()) + sum(extra.values())

    def fingerprint(self) -> str:
        """A hash of the input: config.json, the index and each weight file's name, size, mtime and header."""
        h = hashlib.sha256((self.directory / "config.json").read_bytes())
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            h.update(index.read_bytes())
        for f in self.files:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(8 + min(int.from_bytes(fh.read(8), "little"), _MAX_HEADER)))
        return h.hexdigest()


def _skeleton(p: Path, files: list[Path], dtype, trust_remote_code: bool) -> tuple[nn.Module, dict[str, TensorInfo], torch.dtype]:
    """``(model on meta, every stored tensor, dtype)``: the headers and config.json read, the block
    count compared, the model built without allocating its weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from quantkit.models.load import _one_line, _quiet_transformers, model_from_config, parse_dtype

    _quiet_transformers()
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in tensors:
                raise QuantkitError(f"cannot load {p}: tensor {name} is stored twice ({tensors[name].file.name}, {f.name})")
            tensors[name] = info
    try:
        config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        if "trust_remote_code" in str(e):
            raise QuantkitError(f"cannot load {p}: it ships its own model code (auto_map in config.json), which quantkit "
                                "runs only with --trust-remote-code") from None
        raise QuantkitError(f"cannot load {p}: bad config.json: {_one_line(e)}") from None
    _check_block_count(p, config, tensors)
    dtype = parse_dtype(dtype) or _config_dtype(config) or _first_float_dtype(tensors) or torch.float32
    try:
        with init_empty_weights(include_buffers=False):
            model = model_from_config(config, dtype)
        model.tie_weights()
    except Exception as e:  # noqa: BLE001 - a config that builds no model
        raise QuantkitError(f"cannot build a model from {p / 'config.json'}: {type(e).__name__}: {_one_line(e)}") from None
    if (p / "generation_config.json").is_file():  # as from_pretrained does
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(p)
        except Exception as e:  # noqa: BLE001
            raise QuantkitError(f"cannot load {p / 'generation_config.json'}: {_one_line(e)}") from None
    return model.eval(), tensors, dtype


def _check_block_count(p: Path, config, tensors: dict[str, TensorInfo]) -> None:
    """For an architecture in quantkit's table: config.json's block count is the stored one (more
    would be random blocks, fewer would drop stored ones), checked before a model is built."""
    from quantkit.models.arch import ARCHITECTURES

    spec = next((s for s in ARCHITECTURES if getattr(config, "model_type", None) in s.model_types), None)
    want = getattr(config, "num_hidden_layers", None)
    if spec is None or type(want) is not int:
        return
    pattern = re.compile(r"(?:^|\.)" + re.escape(spec.blocks_path.rsplit(".", 1)[-1]) + r"\.(\d+)\.")
    stored = {int(m.group(1)) for name in tensors if (m := pattern.search(name))}
    if stored and len(stored) != want:
        raise QuantkitError(f"cannot load {p}: config.json says {want} blocks (num_hidden_layers) but the weights hold "
                            f"{len(stored)}: config.json disagrees with the stored weights")


def preflight(directory: str | Path, dtype=None, trust_remote_code: bool = False) -> None:
    """Check a float safetensors checkpoint against its config.json from the headers alone, before
    transformers allocates anything: a clear error for a config that builds no model, a block count,
    a missing tensor or a shape that disagrees (transformers would fill missing weights with random
    values), or a corrupt header.  Architectures outside quantkit's table get the header and config
    checks only (their checkpoints may name tensors differently)."""
    from quantkit.models.arch import ARCHITECTURES

    p = Path(directory)
    if not p.is_dir() or not ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()):
        return
    files = weight_files(p)
    model, tensors, dtype = _skeleton(p, files, dtype, trust_remote_code)
    if any(model.config.model_type in s.model_types for s in ARCHITECTURES):
        src = StreamSource(p, model, arch_for(model), tensors, files, dtype)
        if not src.converted:  # tensors transformers fuses or splits on load are its business
            src.check_names()


def _stored_names(model: nn.Module, tensors: dict[str, TensorInfo]) -> tuple[dict[str, str], list[str]]:
    """``({model name: stored name}, [stored names transformers would convert])``, with the renaming
    rules ``from_pretrained`` applies (transformers >= 5 keeps them in ``conversion_mapping``)."""
    import transformers

    base = getattr(model, "base_model_prefix", "")
    meta = model.state_dict()
    if int(transformers.__version__.split(".")[0]) >= 5:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        out, converted = {}, []
        for k in tensors:
            name, pattern = rename_source_key(k, renamings, converters, base or None, meta)
            if pattern is not None:
                converted.append(k)
            elif name in meta:
                out.setdefault(name, k)
        return out, sorted(converted)
    out = {}  # older transformers: the model's own names, with or without the base model prefix
    for k in tensors:
        for name in (k, f"{base}.{k}", k[len(base) + 1:] if k.startswith(base + ".") else k):
            if name in meta:
                out.setdefault(name, k)
                break
    return out, []


def _count_nonfinite(t: torch.Tensor, chunk: int = 1 << 20) -> int:
    """NaN/Inf values in ``t``, in chunks (a whole-tensor isfinite would cost a copy of it)."""
    if not t.dtype.is_floating_point:
        return 0
    flat, bad = t.reshape(-1), 0
    for i in range(0, flat.numel(), chunk):
        ok = torch.isfinite(flat[i:i + chunk])
        if not ok.all():
            bad += ok.numel() - int(ok.sum())
    return bad


def _config_dtype(config) -> torch.dtype | None:
    from quantkit.models.load import parse_dtype

    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        try:
            return parse_dtype(d)
        except QuantkitError:
            return None
    return d if isinstance(d, torch.dtype) else None


def _first_float_dtype(tensors: dict[str, TensorInfo]) -> torch.dtype | None:
    return next((i.dtype for i in tensors.values() if i.dtype.is_floating_point), None)


# ---- calibration activations in files -------------------------------------------------------------

class DiskActivations(Activations):
    """Calibration hidden states in files, one batch in memory at a time:
    ``root/gen-00003/batch-00000.safetensors`` is batch 0's input to block 3.  The keyword tensors
    (positions, masks; one copy, see :func:`quantkit.calibrate.driver.catch_block_inputs`) stay in memory.

    ``restore``: the files of ``generation`` are already there (a resumed run); appended hidden
    states only bring their keyword arguments.  ``keep_previous``: :meth:`advance` keeps the
    previous generation until :meth:`drop_before` (the resume point must survive a kill)."""

    def __init__(self, root: str | Path, generation: int = 0, restore: bool = False, keep_previous: bool = False):
        super().__init__()
        self.root, self.generation, self.restore, self.keep_previous = Path(root), generation, restore, keep_previous
        self._cached: tuple = (None, None)
        if not restore:
            shutil.rmtree(self._dir(generation), ignore_errors=True)

    def _dir(self, gen: int) -> Path:
        return self.root / f"gen-{gen:05d}"

    def _file(self, gen: int, j: int) -> Path:
        return self._dir(gen) / f"batch-{j:05d}.safetensors"

    def append(self, hidden: torch.Tensor, kwargs: dict) -> None:
        f = self._file(self.generation, len(self))
        if self.restore:
            if not f.is_file():
                raise QuantkitError(f"cannot resume: {f} (calibration inputs of block {self.generation}) is missing; "
                                    "pass the --offload-activations of the interrupted run, or --overwrite to start over")
        else:
            f.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(f, {"hidden": hidden})
        self._kwargs.append(kwargs)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, dict]:
        j = j + len(self) if j < 0 else j
        if not 0 <= j < len(self):
            raise IndexError(j)
        if self._cached[0] != (self.generation, j):  # AWQ looks one batch up many times
            self._cached = (None, None)
            self._cached = ((self.generation, j), load_tensors(self._file(self.generation, j))["hidden"])
        return self._cached[1], self._kwargs[j]

    def advance(self, run: Callable[[torch.Tensor, dict], torch.Tensor]) -> None:
        nxt = self.generation + 1
        shutil.rmtree(self._dir(nxt), ignore_errors=True)
        self._dir(nxt).mkdir(parents=True)
        for j in range(len(self)):
            hidden, kwargs = self[j]
            save_tensors(self._file(nxt, j), {"hidden": run(hidden, kwargs).contiguous()})
        self.generation, self._cached = nxt, (None, None)
        if not self.keep_previous:
            self.drop_before(nxt)

    def drop_before(self, generation: int) -> None:
        for d in self.root.glob("gen-*"):
            if d.name[4:].isdigit() and int(d.name[4:]) < generation:
                shutil.rmtree(d, ignore_errors=True)


class OffloadHooks(BlockHooks):
    """The in-memory driver with calibration activations in files under ``directory``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def activations(self, first: int) -> Activations:
        self.directory.mkdir(parents=True, exist_ok=True)
        import tempfile

        self.store = DiskActivations(tempfile.mkdtemp(prefix="quantkit-acts-", dir=self.directory))
        return self.store

    def cleanup(self) -> None:
        if getattr(self, "store", None) is not None:
            shutil.rmtree(self.store.root, ignore_errors=True)


# ---- the work directory (resume point) ------------------------------------------------------------

def work_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


class WorkDir:
    """``.OUT.partial``: ``blocks/block-00003.safetensors`` (block 3 packed), ``manifest.json`` and
    a lock, so two runs never write one output.  Files are renamed into place, so a run killed at
    any point leaves either the old or the new state."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = work_dir_for(out)
        self._lock = None

    def acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / "lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise QuantkitError(f"another quantkit run is writing {self.out} (it holds {self.path / 'lock'})") from None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def clear(self) -> None:
        for p in self.path.iterdir():
            if p.name != "lock":
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            m = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            m = None
        if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION or not isinstance(m.get("done"), int):
            raise QuantkitError(f"cannot resume: {self.manifest_path} is unreadable; pass --overwrite to start over")
        return m

    def write_manifest(self, manifest: dict) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, default=str))
        os.replace(tmp, self.manifest_path)

    def part(self, index: int) -> Path:
        return self.path / "blocks" / f"block-{index:05d}.safetensors"


@dataclass
class StreamHooks(BlockHooks):
    """The driver's hooks when streaming: load a block from the shards before it runs; after it,
    pack it, write it to the work directory, record it in the manifest and free it."""

    def __init__(self, source: StreamSource, work: WorkDir, manifest: dict, acts_dir: Path):
        self.source, self.work, self.manifest, self.acts_dir = source, work, manifest, acts_dir
        self.store: DiskActivations | None = None
        self._outer_loaded = False
        kill = os.environ.get(KILL_AFTER_BLOCK_ENV, "")
        self._kill_after = int(kill) if kill.lstrip("-").isdigit() else None

    @property
    def done(self) -> int:
        return self.manifest["done"]

    def first_block(self, n_blocks: int, result: CompressionResult) -> int:
        if self.manifest.setdefault("n_blocks", n_blocks) != n_blocks:
            raise QuantkitError(f"cannot resume: {self.work.manifest_path} is for {self.manifest['n_blocks']} blocks, the model has {n_blocks}")
        result.log.extend(LayerRecord(**r) for r in self.manifest.get("log", []))
        result.quantized.update({n: PackedEntry(e["kind"], e["entry"]) for n, e in self.manifest.get("modules", {}).items()})
        result.extra.update(self.manifest.get("extra", {}))
        return self.done

    def activations(self, first: int) -> Activations:
        # the embeddings (and whatever else precedes block 0) run once, to catch block 0's inputs
        self.source.materialize(self.source.outer_names())
        self._outer_loaded = True
        self.store = DiskActivations(self.acts_dir, first, restore=first > 0, keep_previous=True)
        return self.store

    def load_block(self, index: int, block: nn.Module) -> None:
        if self._outer_loaded:  # inputs are caught: the embeddings and head go until the checkpoint is assembled
            self.source.free(self.source.outer_names())
            self._outer_loaded = False
            release_freed_memory()  # glibc keeps freed tensors resident otherwise (see quantkit.memory)
        self.source.materialize(self.source.block_names(index))

    def block_done(self, index: int, block: nn.Module, result: CompressionResult, inputs) -> None:
        prefix = f"{self.source.prefix}{index}."
        pack_finished(self.source.model, result, prefix)  # the codes are in the packed modules now
        state = {prefix + k: v for k, v in block.state_dict().items()}
        part = self.work.part(index)
        part.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(part, state)
        self.manifest.update(
            done=index + 1,
            log=[dataclasses.asdict(r) for r in result.log],
            modules={n: {"kind": q.kind, "entry": q.config_entry()} for n, q in result.quantized.items()},
            extra=result.extra,
        )
        self.work.write_manifest(self.manifest)
        if self.store is not None:
            self.store.drop_before(self.store.generation)
        block.to("meta")
        self.source.forget(self.source.block_names(index))
        release_freed_memory()
        if self._kill_after is not None and index >= self._kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def entries(self) -> list[Entry]:
        """Every tensor of the final checkpoint: the outer ones read from the input, each block's from its part."""
        src, out = self.source, []
        for group in src.tie_groups(src.outer_names()):
            slot = src.slots[group[0]]
            out.append((group[0], slot.dtype, tuple(slot.shape), lambda n=group[0]: src.read(n)))
        for i in range(self.manifest["n_blocks"]):
            for name, info in read_header(self.work.part(i)).items():
                out.append((name, info.dtype, info.shape, lambda info=info: read_tensor(info)))
        return out


def _settings(source: StreamSource, method_name: str, config, calib_ids: torch.Tensor | None, batch_size: int) -> dict:
    from quantkit.checkpoint.packed import FORMAT_VERSION

    method = json.dumps({"method": method_name, "config": dataclasses.asdict(config), "format": FORMAT_VERSION},
                        sort_keys=True, default=str)
    if calib_ids is None:
        calib = "none"
    else:
        calib = hashlib.sha256(calib_ids.contiguous().numpy().tobytes() + f"{tuple(calib_ids.shape)}:{batch_size}".encode()).hexdigest()
    return {"input model": source.fingerprint(), "method settings": hashlib.sha256(method.encode()).hexdigest(),
            "calibration data": calib, "dtype": str(source.dtype)}


def compress_streaming(model_path: str | Path, out: str | Path, method_name: str, options, *, calib: str | None = None,
                       nsamples: int = 128, seqlen: int = 2048, seed: int = 0, batch_size: int = 8, dtype=None,
                       resume: bool = False, overwrite: bool = False, offload_dir: str | Path | None = None,
                       trust_remote_code: bool = False, source: StreamSource | None = None,
                       progress: Callable[[int, int, str], None] | None = None) -> CompressionResult:
    """Compress a safetensors checkpoint block by block from disk and write the packed checkpoint to
    ``out`` (atomically): the same bytes :func:`quantkit.api.compress` + :func:`quantkit.api.save`
    write, without holding the model in memory.  ``resume``: continue the run that was killed
    writing ``out``; ``offload_dir``: where calibration activations go (default: the work dir)."""
    from quantkit import api
    from quantkit.checkpoint.packed import atomic_output_dir, quantization_config, save_metadata
    from quantkit.data import calibration_samples
    from quantkit.models.load import load_tokenizer

    out = Path(out)
    if out.exists() and not overwrite:
        raise QuantkitError(f"output {out} already exists; pass --overwrite to replace it")
    src = source or StreamSource.open(model_path, dtype, trust_remote_code)
    tok = load_tokenizer(str(model_path), trust_remote_code)
    method_cls = api.get_method(method_name)
    config = options if dataclasses.is_dataclass(options) else api.make_config(method_name, dict(options))
    if getattr(config, "quantize_lm_head", False):
        raise QuantkitError("--stream does not quantize lm_head yet (it needs the whole model in front of it); drop --quantize-lm-head or --stream")
    calib_ids = None
    if method_cls.needs_calibration:
        if calib is None:
            raise QuantkitError(f"method {method_name!r} needs calibration data (--calib)")
        calib_ids = calibration_samples(tok, calib, nsamples, seqlen, seed)
    settings = _settings(src, method_name, config, calib_ids, batch_size)
    work = WorkDir(out)
    work.acquire()
    manifest = None
    try:
        manifest = work.read_manifest()
        if manifest is not None and manifest["done"] == 0:
            manifest = None  # killed before its first block was written: nothing to resume
        if manifest is not None and not resume and not overwrite:
            raise QuantkitError(f"{work.path} holds an unfinished run for {out} ({manifest['done']} of "
                                f"{manifest.get('n_blocks', '?')} blocks done): pass --resume to continue it, or --overwrite to start over")
        if manifest is not None and resume:
            changed = [k for k, v in settings.items() if manifest.get("settings", {}).get(k) != v]
            if changed:
                raise QuantkitError(f"cannot resume {out}: the unfinished run in {work.path} was started with another "
                                    f"{' and another '.join(changed)}; pass --overwrite to start over")
        else:
            work.clear()
            key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]  # one directory per output
            acts = Path(offload_dir) / f"quantkit-acts-{key}" if offload_dir else work.path / "acts"
            manifest = {"version": MANIFEST_VERSION, "settings": settings, "done": 0, "acts_dir": str(acts.resolve())}
            work.write_manifest(manifest)
    except BaseException:
        if manifest is None or manifest.get("done", 0) == 0:
            work.remove()
        work.release()
        raise
    acts_dir = Path(manifest["acts_dir"])  # a resumed run keeps the activations where it left them
    hooks = StreamHooks(src, work, manifest, acts_dir)
    keep = False  # keep the finished blocks for --resume: only when the run stopped for reasons outside its inputs
    try:
        result = api.compress(src.model, method_name, config, calib_ids=calib_ids, batch_size=batch_size,
                              progress=progress, hooks=hooks)
        qcfg = quantization_config(method_name, result.quantized, result.extra.get("config", {})) if result.quantized else None
        with atomic_output_dir(out, overwrite) as tmp:
            write_safetensors(tmp / "model.safetensors", hooks.entries(), {"format": "pt"})
            save_metadata(src.model, tok, tmp, qcfg, result)
        return result
    except QuantkitError:
        raise  # bad input or settings: a resume would meet it again
    except (OSError, MemoryError, RuntimeError) as e:  # disk full, out of memory...: fix it, then --resume
        oom = isinstance(e, MemoryError) or "can't allocate memory" in str(e)
        keep = hooks.done > 0 and (oom or isinstance(e, OSError))
        if not keep:
            raise
        what = "out of memory" if oom else f"{type(e).__name__}: {str(e).strip()[:200]}"
        raise QuantkitError(f"{what} ({hooks.done} finished block(s) kept in {work.path}: --resume continues)") from None
    except BaseException:  # Ctrl-C
        keep = hooks.done > 0
        raise
    finally:
        if keep:
            work.release()
        else:
            shutil.rmtree(acts_dir, ignore_errors=True)
            work.remove()


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None  # unreadable /proc/meminfo: the size is unknown
    return None  # no MemAvailable line (old kernels)


def should_stream(path: str | Path, dtype=None, fraction: float = 0.5) -> bool:
    """Stream automatically when ``path`` is a float safetensors directory whose weights (at the
    dtype they will be loaded in) take more than ``fraction`` of the available memory."""
    from quantkit.models.load import parse_dtype, read_quantization_config

    p = Path(path)
    avail = available_memory()
    if avail is None or not p.is_dir() or not (p / "config.json").is_file():
        return False
    try:
        if read_quantization_config(p) is not None:
            return False
        files = weight_files(p)
        infos = [i for f in files for i in read_header(f).values()]
    except QuantkitError:
        return False  # the normal path reports what is wrong
    want = parse_dtype(dtype)
    size = sum((i.end - i.start) // i.dtype.itemsize * (want.itemsize if want and i.dtype.is_floating_point else i.dtype.itemsize)
               for i in infos)
    return size > fraction * avail


__all__ = ["compress_streaming", "StreamSource", "DiskActivations", "OffloadHooks", "StreamHooks", "WorkDir",
           "read_header", "read_tensor", "write_safetensors", "should_stream", "work_dir_for", "preflight"]
