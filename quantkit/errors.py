"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations

import reprlib


class QuantkitError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


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
