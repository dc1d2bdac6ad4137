"""The runtime's online transforms: a rotated model's :class:`~quantkit.core.rotation.OnlineHadamard`
hooks (before ``down_proj``) run on the portable C transform (:mod:`quantkit.kernels.native.hadamard`)
where it builds, else on PyTorch's products.  Same function either way, to float32 rounding; each
path gives a row the same bits alone or in a batch.

    >>> use_native_transforms(model)   # doctest: +SKIP   -> how many hooks now run in C
"""

from __future__ import annotations

from torch import nn

from quantkit.core.rotation import online_transforms
from quantkit.kernels.native import NativeHadamard, hadamard_available


def use_native_transforms(model: nn.Module) -> int:
    """Point every online Hadamard hook of ``model`` at the C transform (when it is available
    here and ``QUANTKIT_NATIVE`` is not ``0``); returns how many now run in C."""
    hooks = [h for m in model.modules() for h in online_transforms(m)]
    if not hooks or not hadamard_available():
        return 0
    for h in hooks:
        h.kernel = NativeHadamard(h.transform.factor, h.transform.n)
    return len(hooks)
