"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class QuantkitError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
