"""The work directory of a streamed run, ``.OUT.partial`` beside ``OUT``: finished blocks, the
activations feeding the next block and ``manifest.json``, the resume point of a killed run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path


from quantkit.errors import QuantkitError

MANIFEST_VERSION = 1


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
