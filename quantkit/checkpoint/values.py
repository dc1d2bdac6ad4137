"""The values of a loaded packed checkpoint, checked once its tensors are read: every loader of a
quantized format (quantkit-v1, GPTQ, AWQ) ends with :func:`check_loaded`.

Sizes are checked before anything is allocated (:func:`quantkit.runtime.swap.swap_in_runtime_modules`);
what only the values can show is checked here, cheaply (chunked finiteness, a min and a max):

* every float tensor (scales, biases, norms, embeddings, low-rank factors) is finite;
* every ``g_idx`` entry names one of its layer's groups, ``0 <= g < n_groups``;
* every zero point lies on its grid, ``0 <= z <= zero_max(bits)`` (quantkit-v1 stores them as
  uint8, so ``2**bits - 1`` is checked; GPTQ and AWQ pack them in ``bits``-wide fields, in range
  by construction, see :mod:`quantkit.checkpoint.gptq` for GPTQ v1's ``z - 1``).

Codes need no check: ``bits``-wide packed fields hold only codes of the grid.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models.skeleton import count_nonfinite
from quantkit.runtime.qlinear import QuantLinear


def grid_zero_max(bits: int) -> int:
    """The largest zero point of a ``bits``-bit grid (its largest code)."""
    return 2**bits - 1


def check_loaded(model: nn.Module, where, zero_max: Callable[[int], int] | None = grid_zero_max) -> None:
    """Refuse a loaded quantized model whose tensors hold NaN/Inf, a ``g_idx`` outside its
    layer's groups or (``zero_max`` given) a zero point beyond ``zero_max(bits)``; ``where``
    (the checkpoint's path) starts the message."""
    seen = set()
    for name, t in model.state_dict().items():  # what the checkpoint stored, not buffers the model computes (masks)
        if t.data_ptr() in seen:  # a tied tensor once
            continue
        seen.add(t.data_ptr())
        bad = count_nonfinite(t)
        if bad:
            raise QuantkitError(f"cannot load {where}: {name} holds {bad} NaN/Inf value(s)")
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        n_groups = mod.scales.shape[1]
        if mod.g_idx is not None:
            check_range(where, f"{name}.g_idx", mod.g_idx, n_groups - 1, "group",
                        f"the layer has {n_groups} group(s), 0..{n_groups - 1}")
        if mod.qzeros is not None and zero_max is not None:
            top = zero_max(mod.bits)
            check_range(where, f"{name}.qzeros", mod.qzeros, top, "zero point", f"a {mod.bits}-bit grid's zero points lie in 0..{top}")


def check_range(where, name: str, t: torch.Tensor, top: int, what: str, why: str) -> None:
    """Refuse integer tensor ``t`` (named ``name``) unless all its entries lie in ``0..top``."""
    if not t.numel():
        return
    low, high = int(t.min()), int(t.max())
    if low < 0 or high > top:
        raise QuantkitError(f"cannot load {where}: {name} holds {what} {low if low < 0 else high}; {why}")
