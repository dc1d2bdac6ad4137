"""Which device work runs on: the one reading of ``--device`` (``auto``, ``cpu``, ``cuda``,
``cuda:N``) for the compressing and the running commands alike.

``auto`` is the first CUDA GPU PyTorch sees, else the CPU.  Asking for a GPU that is not there is
a one-line :class:`~quantkit.errors.QuantkitError`, raised before any work.

    >>> resolve_device("auto")          # doctest: +SKIP
    device(type='cuda', index=0)
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``name`` as a concrete device (a CUDA device always with its index)."""
    if name is None or (isinstance(name, str) and name.strip().lower() in ("", "auto")):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name.strip().lower() if isinstance(name, str) else name)
    except (RuntimeError, ValueError):
        raise QuantkitError(f"unknown device {name!r}; use one of {', '.join(DEVICE_CHOICES)} or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise QuantkitError(f"device {name!r} is not supported; use one of {', '.join(DEVICE_CHOICES)} or cuda:N")
    if not torch.cuda.is_available():
        why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "PyTorch sees no CUDA GPU"
        raise QuantkitError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise QuantkitError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)
