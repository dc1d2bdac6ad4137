"""Writing a checkpoint block by block while the model streams from disk: the driver's hooks
(:class:`StreamHooks`) load a block from the input shards before it runs; after it, they pack it,
write it to the work directory, record it in the manifest and free it.  At the end the checkpoint
is assembled tensor by tensor into the same ``model.safetensors`` the in-memory path writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantkit.calibrate.driver import Activations, BlockHooks
from quantkit.calibrate.offload import DiskActivations
from quantkit.calibrate.workdir import WorkDir
from quantkit.checkpoint.packed import FORMAT_VERSION, storage_dtype, stored_as
from quantkit.core.types import CompressionResult, LayerRecord, PackedEntry
from quantkit.errors import QuantkitError
from quantkit.memory import release_freed_memory
from quantkit.models.safetensors import Entry, read_header, read_tensor, save_tensors
from quantkit.models.skeleton import StreamSource
from quantkit.runtime.swap import pack_finished


@dataclass
class StreamHooks(BlockHooks):
    """The driver's hooks when streaming: load a block from the shards before it runs; after it,
    pack it, write it to the work directory, record it in the manifest and free it."""

    def __init__(self, source: StreamSource, work: WorkDir, manifest: dict, acts_dir: Path):
        self.source, self.work, self.manifest, self.acts_dir = source, work, manifest, acts_dir
        self.store: DiskActivations | None = None
        self._outer_loaded = False

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
        floats, compressed = storage_dtype(self.source.model), tuple(f"{n}." for n in result.quantized)
        state = {}
        for k, v in block.state_dict().items():
            state[prefix + k] = v.to(stored_as(prefix + k, v, floats, compressed))
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

    def entries(self) -> list[Entry]:
        """Every tensor of the final checkpoint: the outer ones read from the input, each block's from its part."""
        src, out = self.source, []
        floats = storage_dtype(src.model)
        for group in src.tie_groups(src.outer_names()):
            slot = src.slots[group[0]]
            dtype = stored_as(group[0], slot, floats, ())
            out.append((group[0], dtype, tuple(slot.shape), lambda n=group[0], dtype=dtype: src.read(n).to(dtype)))
        for i in range(self.manifest["n_blocks"]):
            for name, info in read_header(self.work.part(i)).items():
                out.append((name, info.dtype, info.shape, lambda info=info: read_tensor(info)))
        return out


def stream_settings(source: StreamSource, method_name: str, config, calib_ids: torch.Tensor | None, batch_size: int) -> dict:
    """What a resumed run must share with the killed one: hashes of the input, the method
    settings and the calibration data, and the dtype."""
    method = json.dumps({"method": method_name, "config": dataclasses.asdict(config), "format": FORMAT_VERSION},
                        sort_keys=True, default=str)
    if calib_ids is None:
        calib = "none"
    else:
        calib = hashlib.sha256(calib_ids.contiguous().numpy().tobytes() + f"{tuple(calib_ids.shape)}:{batch_size}".encode()).hexdigest()
    return {"input model": source.fingerprint(), "method settings": hashlib.sha256(method.encode()).hexdigest(),
            "calibration data": calib, "dtype": str(source.dtype)}
