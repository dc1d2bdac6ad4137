"""Calibration activations kept in files instead of memory (``--offload-activations``, and always
when streaming): one batch in memory at a time.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from quantkit.calibrate.driver import Activations, BlockHooks
from quantkit.errors import QuantkitError
from quantkit.models.safetensors import load_tensors, save_tensors


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
