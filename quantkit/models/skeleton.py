"""The input checkpoint of a run, before any weight is loaded: its safetensors files, a model
skeleton on the ``meta`` device checked against the stored headers (:func:`preflight`, which the
ordinary loader runs too), the tensors of one block at a time (:class:`StreamSource`), and whether
a model is too large for memory (:func:`should_stream`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.memory import available_memory
from quantkit.models.paths import check_model_files, file_kind, is_hub_id, one_line, parse_dtype, quiet_transformers, read_quantization_config
from quantkit.models.arch import ArchSpec, arch_for, find_arch, get_module
from quantkit.models.config import check_config
from quantkit.models.moe import Experts, renamer, unfuse_experts
from quantkit.models.safetensors import TensorInfo, raw_header, read_header, read_tensor


def model_from_config(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM built from ``config`` without spending time on random initialisation
    (its weights are about to be loaded); a config whose values would make the forward NaN is
    refused first (:func:`quantkit.models.config.check_config`)."""
    from transformers import AutoModelForCausalLM

    from transformers.initialization import no_init_weights  # every transformers in the tested range has it

    check_config(config)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_experts(model)  # MoE: per-expert linears (quantkit.models.moe), as every checkpoint of it names them
    return model


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

        p = Path(path)
        if p.is_file() or (p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf"))):
            if p.suffix == ".gguf" or p.is_dir():
                raise _not_streamable(path, "a GGUF file is not stored as safetensors blocks; quantize it without --stream")
            raise QuantkitError(f"{path} is a file but not a .gguf; give a model directory or a .gguf file")
        if not p.exists():
            if is_hub_id(str(path)):
                raise _not_streamable(path, "--stream reads a local directory; download the model first")
            raise QuantkitError(f"model path {str(path)!r} does not exist")
        if not p.is_dir():
            raise QuantkitError(f"model path {str(path)!r} is {file_kind(p)}, not a model directory")
        check_model_files(p)
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
        """Every parameter has a stored tensor of its shape, of a float dtype where the parameter is
        a float one (an integer tensor would be cast, not read): checked from the headers, before any work."""
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
            if isinstance(slot, nn.Parameter) and slot.dtype.is_floating_point and not info.dtype.is_floating_point:
                raise QuantkitError(f"cannot load {self.directory}: {stored} is stored as {_dtype_name(info.dtype)}, an integer "
                                    f"type, for a float parameter ({_dtype_name(slot.dtype)}): its bytes would be cast, not read")

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
        bad = count_nonfinite(t)
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
            raw = raw_header(f)
            h.update(len(raw).to_bytes(8, "little") + raw)
        return h.hexdigest()


def _skeleton(p: Path, files: list[Path], dtype, trust_remote_code: bool) -> tuple[nn.Module, dict[str, TensorInfo], torch.dtype]:
    """``(model on meta, every stored tensor, dtype)``: the headers and config.json read, the block
    count compared, the model built without allocating its weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig


    quiet_transformers()
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
        raise QuantkitError(f"cannot load {p}: bad config.json: {one_line(e)}") from None
    _check_block_count(p, config, tensors)
    stored = _config_dtype(config) or _first_float_dtype(tensors)  # before model_from_config sets config.dtype
    dtype = parse_dtype(dtype) or stored or torch.float32
    try:
        with init_empty_weights(include_buffers=False):
            model = model_from_config(config, dtype)
        model.config.dtype = stored or dtype  # what the checkpoint stores, whatever --dtype computes in
        model.tie_weights()
    except QuantkitError:
        raise
    except Exception as e:  # noqa: BLE001 - a config that builds no model
        raise QuantkitError(f"cannot build a model from {p / 'config.json'}: {type(e).__name__}: {one_line(e)}") from None
    if (p / "generation_config.json").is_file():  # as from_pretrained does
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(p)
        except Exception as e:  # noqa: BLE001
            raise QuantkitError(f"cannot load {p / 'generation_config.json'}: {one_line(e)}") from None
    return model.eval(), tensors, dtype


def _check_block_count(p: Path, config, tensors: dict[str, TensorInfo]) -> None:
    """For an architecture in quantkit's table: config.json's block count is the stored one (more
    would be random blocks, fewer would drop stored ones), checked before a model is built."""

    spec = find_arch(getattr(config, "model_type", None))
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

    p = Path(directory)
    if not p.is_dir() or not ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()):
        return
    files = weight_files(p)
    model, tensors, dtype = _skeleton(p, files, dtype, trust_remote_code)
    if find_arch(model.config.model_type) is not None:
        src = StreamSource(p, model, arch_for(model), tensors, files, dtype)
        if not src.converted:  # tensors transformers fuses or splits on load are its business
            src.check_names()


def _stored_names(model: nn.Module, tensors: dict[str, TensorInfo]) -> tuple[dict[str, str], list[str]]:
    """``({model name: stored name}, [stored names transformers would convert])``, with the renaming
    rules ``from_pretrained`` applies (transformers >= 5 keeps them in ``conversion_mapping``)."""
    import transformers

    base = getattr(model, "base_model_prefix", "")
    meta = model.state_dict()
    spec = find_arch(getattr(model.config, "model_type", None))
    own_name = renamer(spec.moe.stored_names if spec is not None and spec.moe else ())
    experts = {n for n, m in model.named_modules() if isinstance(m, Experts)}
    if int(transformers.__version__.split(".")[0]) >= 5:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        out, converted = {}, []
        for k in tensors:
            own = own_name(k)  # MoE: the expert's own names
            if own in meta:
                out.setdefault(own, k)
                continue
            name, pattern = rename_source_key(k, renamings, converters, base or None, meta)
            if pattern is not None or name.rpartition(".")[0] in experts:  # converted, or experts stored fused
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


def count_nonfinite(t: torch.Tensor, chunk: int = 1 << 20) -> int:
    """NaN/Inf values in ``t``, in chunks (a whole-tensor isfinite would cost a copy of it)."""
    if not t.dtype.is_floating_point:
        return 0
    flat, bad = t.reshape(-1), 0
    for i in range(0, flat.numel(), chunk):
        ok = torch.isfinite(flat[i:i + chunk])
        if not ok.all():
            bad += ok.numel() - int(ok.sum())
    return bad


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _config_dtype(config) -> torch.dtype | None:

    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        try:
            return parse_dtype(d)
        except QuantkitError:
            return None
    return d if isinstance(d, torch.dtype) else None


def _first_float_dtype(tensors: dict[str, TensorInfo]) -> torch.dtype | None:
    return next((i.dtype for i in tensors.values() if i.dtype.is_floating_point), None)




def should_stream(path: str | Path, dtype=None, fraction: float = 0.5) -> bool:
    """Stream automatically when ``path`` is a float safetensors directory whose weights (at the
    dtype they will be loaded in) take more than ``fraction`` of the available memory."""
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

