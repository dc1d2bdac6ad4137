"""Where a command may write, decided once: the rules for ``-o OUT`` and the atomic writers.

* Never replaced, with or without ``--overwrite``: an empty OUT (``-o ""``), the filesystem root,
  the home directory, the current directory or any directory above it, an input (the model, the
  calibration file, the recipe...) or a directory holding one.  An OUT strictly inside the input
  model's directory is allowed: writing or replacing it never touches the input's own files.
* An existing OUT is replaced only with ``--overwrite``, and only if quantkit wrote it: a
  directory carrying the :data:`MARKER` file (every directory quantkit writes has it), an empty
  directory, or one written before the marker existed (a ``quant_log.csv``, or a ``config.json``
  whose ``quantization_config`` says ``quant_method: quantkit`` or ``quantizer: [quantkit]``).  A
  file output (a GGUF export) replaces only a GGUF file.
* Before any work the parent is probed (a temporary directory made and removed where OUT will go),
  so a read-only filesystem or a parent that is a file is refused before the model is loaded.
* Writes go to ``.OUT.tmp-PID-XXXX`` beside OUT, renamed into place at the end.  An existing OUT
  is renamed aside (``.OUT.old-PID-XXXX``), the new one renamed in, then the old one deleted: a
  crash never loses both.  Temporary names carry the writer's process id, so the next run writing
  OUT removes those of a killed run (and puts back an OUT set aside by a run killed mid-replace).

    >>> with atomic_output_dir("out/q4", overwrite=True, inputs=["models/base"]) as tmp:  # doctest: +SKIP
    ...     (tmp / "config.json").write_text("{}")
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from quantkit.errors import QuantkitError, os_reason, write_error

MARKER = ".quantkit"
MARKER_TEXT = "This directory was written by quantkit: `--overwrite` may replace it.\n"
GGUF_MAGIC = b"GGUF"


def check_output(out: str | Path, overwrite: bool = False, inputs: Iterable = (), kind: str = "dir") -> None:
    """The one rule for an output path (``kind``: ``"dir"`` or ``"file"``): commands check it
    before any work, the writers again when they rename into place.  ``inputs``: paths the run
    reads, which OUT must neither be nor hold."""
    path = _refuse_protected(out, inputs)
    if os.path.lexists(path):
        _check_existing(path, out, overwrite, kind)
    clean_stale(path)
    _probe(path, out)


def _refuse_protected(out, inputs: Iterable) -> Path:
    if str(out) == "":
        raise QuantkitError('output path is empty (-o ""); give the directory to write')
    path = Path(out)
    here, home = Path.cwd().resolve(), _home()
    for p in {Path(os.path.abspath(path)), path.resolve()}:  # as given, and with symlinks followed
        if p.parent == p:
            raise QuantkitError(f"output {out} is the filesystem root; quantkit never replaces it: choose a new directory")
        if p == home:
            raise QuantkitError(f"output {out} is your home directory; quantkit never replaces it: choose a new directory")
        if p == here or p in here.parents:
            raise QuantkitError(f"output {out} is the current directory or one above it; quantkit never replaces it: "
                                "choose a new directory")
        for given in inputs:
            if given is None or str(given) == "" or not os.path.lexists(given):
                continue  # a hub id or a dataset name: nothing local to protect
            for i in {Path(os.path.abspath(given)), Path(given).resolve()}:
                if p == i:
                    raise QuantkitError(f"output {out} is the input {given}; write to another directory")
                if p in i.parents:
                    raise QuantkitError(f"output {out} holds the input {given}; replacing it would delete the input: "
                                        "choose another -o")
    return path


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError, OSError):
        return None


def _check_existing(path: Path, out, overwrite: bool, kind: str) -> None:
    if kind == "file":
        if path.is_dir():
            raise QuantkitError(f"output {out} is a directory; give a .gguf file path")
        if not is_gguf(path):
            raise QuantkitError(f"output {out} already exists and is not a GGUF file: remove it yourself or choose another -o")
    elif not path.is_dir():
        raise QuantkitError(f"output {out} already exists and is a file, not a checkpoint directory: "
                            "remove it yourself or choose another -o")
    elif not written_by_quantkit(path):
        raise QuantkitError(f"output {out} already exists and was not written by quantkit (it has no {MARKER} file): "
                            "remove it yourself or choose another -o")
    if not overwrite:
        raise QuantkitError(f"output {out} already exists; pass --overwrite to replace it")


def written_by_quantkit(directory: Path) -> bool:
    """May ``--overwrite`` replace ``directory``: it carries the marker, is empty, or is a
    checkpoint quantkit wrote before the marker existed."""
    try:
        if (directory / MARKER).is_file() or next(directory.iterdir(), None) is None:
            return True
        if (directory / "quant_log.csv").is_file():
            return True
        qcfg = json.loads((directory / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qcfg, dict) and (qcfg.get("quant_method") == "quantkit" or "quantkit" in (qcfg.get("quantizer") or ()))


def is_gguf(path: Path) -> bool:
    if not path.is_file():  # never open a FIFO or a device: reading it could block
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _probe(path: Path, out) -> None:
    """Make and remove a temporary directory where OUT will go (its nearest existing ancestor
    while the parent is still to be made): an unwritable place is refused before any work."""
    where = path.parent
    while not os.path.lexists(where):
        where = where.parent
    if not where.is_dir():
        raise QuantkitError(f"cannot write {out}: {where} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=temp_prefix(path), dir=where))
    except OSError as e:
        raise write_error(out, e) from None


def temp_prefix(out: Path, what: str = "tmp") -> str:
    """``.OUT.tmp-PID-``: the names a writer's temporary files take beside OUT."""
    return f".{out.name}.{what}-{os.getpid()}-"


def clean_stale(out: Path) -> None:
    """Remove what a killed run writing ``out`` left beside it: ``.OUT.tmp-PID-*`` of a process
    that is gone; an ``.OUT.old-PID-*`` (the previous OUT, set aside) goes back to OUT if OUT is missing."""
    parent = Path(os.path.abspath(out)).parent
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-")
    try:
        entries = [e.name for e in os.scandir(parent)]
    except OSError:
        return
    for name in entries:
        m = pattern.match(name)
        if m is None or _alive(int(m[2])):
            continue
        stale = parent / name
        if m[1] == "old" and not os.path.lexists(out):
            os.rename(stale, out)
        else:
            _remove(stale)


def _alive(pid: int) -> bool:
    if pid == os.getpid() or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, inputs: Iterable = ()):
    """Yield a temporary directory beside ``out``; it becomes ``out`` (with the marker) only if the
    body succeeds.  A write fault (disk full, read-only, size limit) is a :class:`~quantkit.errors.WriteError`
    naming ``out``."""
    out = Path(out)
    check_output(out, overwrite, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint should read like any directory
    except OSError as e:
        raise write_error(out, e) from None
    try:
        yield tmp
        (tmp / MARKER).write_text(MARKER_TEXT)
        _replace(tmp, out, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and os_reason(e):
            raise write_error(out, e) from None
        raise


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; an ``out`` that appeared meanwhile is checked again, set aside,
    and deleted only once the new one is in place."""
    if not os.path.lexists(out):
        tmp.rename(out)
        return
    _check_existing(out, out, overwrite, "dir")
    aside = out.parent / (temp_prefix(out, "old") + secrets.token_hex(4))
    os.rename(out, aside)
    try:
        tmp.rename(out)
    except BaseException:
        os.rename(aside, out)
        raise
    _remove(aside)


@contextlib.contextmanager
def atomic_output_file(out: str | Path, overwrite: bool = False, inputs: Iterable = ()):
    """Yield a temporary file path beside ``out``; renamed over ``out`` only if the body succeeds."""
    out = Path(out)
    check_output(out, overwrite, inputs, kind="file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out, e) from None
    tmp = out.parent / (temp_prefix(out) + secrets.token_hex(4))
    try:
        yield tmp
        if os.path.lexists(out):
            _check_existing(out, out, overwrite, "file")
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and os_reason(e):
            raise write_error(out, e) from None
        raise
