"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations

import errno

# what an OSError means to a user, by errno: faults of the disk or the environment, not of quantkit
_OS_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large (over the file-size limit, see ulimit -f)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOTDIR: "a component of the path is a file, not a directory",
    errno.EISDIR: "it is a directory",
    errno.EIO: "input/output error (a failing disk?)",
}


class QuantkitError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class WriteError(QuantkitError):
    """Writing an output failed for a reason outside quantkit (disk full, read-only, size limit):
    a streamed run keeps its finished blocks for ``--resume``."""


def os_reason(e: OSError) -> str | None:
    """The plain-words reason of an environment OSError (``no space left on device``), None for others."""
    return _OS_REASONS.get(e.errno)


def write_error(path, e: OSError) -> WriteError:
    """``cannot write PATH: <reason>``: one line naming what could not be written and why."""
    reason = os_reason(e) or (e.strerror or str(e) or type(e).__name__).strip().lower()
    return WriteError(f"cannot write {path}: {reason}")
