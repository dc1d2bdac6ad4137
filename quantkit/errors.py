"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations

import errno
import reprlib

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


class _BoundedRepr(reprlib.Repr):
    """reprlib's walk (a few items per level, a few levels deep), with integers too long to
    print (Python refuses past 4300 digits) named by their size instead."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 48, 48, 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = self.maxdeque = self.maxarray = 4

    def repr_int(self, x, level):
        if x.bit_length() > 128:
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()


def excerpt(value, limit: int = 60) -> str:
    """``repr(value)`` for an error message, at most about ``limit`` characters.  The whole repr
    of a user's value is never built: a YAML alias bomb expands to gigabytes, and a 5000-digit
    integer has no repr at all.

        >>> len(excerpt(["lol"] * 10**6)) <= 60
        True
    """
    text = " ".join(_REPR.repr(value).split())  # one line
    return text if len(text) <= limit else text[: max(limit - 3, 1)] + "..."


def clip(message: str, limit: int = 200) -> str:
    """``message`` on one line, cut to ``limit`` characters (a message that already quotes a value)."""
    text = " ".join(message[: limit * 4].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
