"""The online Hadamard transform in C (``kernels/hadamard.c``, built by
:func:`~quantkit.kernels.native.build.portable_library` on any CPU with a C compiler): the
transform a rotated model applies before ``down_proj`` at every token, one call instead of
PyTorch's several small products (their dispatch dominates a decode step's few rows).
Reference: :class:`quantkit.core.hadamard.HadamardTransform`.

    >>> y = hadamard_rows(x, t.factor)   # doctest: +SKIP   x [..., n] -> x @ kron(A, H_p), float32
"""

from __future__ import annotations

import torch

from quantkit.kernels.native.build import NativeUnavailable, portable_library


def hadamard_available() -> bool:
    """Whether the portable library built and loaded here."""
    return not isinstance(portable_library(), NativeUnavailable)


class NativeHadamard:
    """``x [..., n] -> x @ kron(A, H_p)`` as a new float32 tensor, ``A = factor`` (float32 ``[k, k]``;
    pass ``A^T`` for the inverse), ``p = n / k`` a power of two; every row on its own.  The sizes
    are checked once, here: a call is one copy of ``x`` and one C call."""

    def __init__(self, factor: torch.Tensor, n: int):
        k = factor.shape[0]
        p = n // k if k and n % k == 0 else 0
        if p < 1 or p & (p - 1) or tuple(factor.shape) != (k, k):
            raise ValueError(f"a native Hadamard transform needs n = k * 2^m: n = {n}, factor {tuple(factor.shape)}")
        self.n, self.k = n, k
        self.a = factor.detach().to("cpu", torch.float32).contiguous()
        self._call = portable_library().qk_hadamard_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n or x.device.type != "cpu":
            raise ValueError(f"the transform takes {self.n} features on the CPU, not {x.shape[-1]} on {x.device}")
        y = x.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        rows = y.numel() // self.n
        if rows and self._call(y.data_ptr(), rows, self.n, self.a.data_ptr(), self.k, torch.get_num_threads()):
            raise MemoryError("the native Hadamard transform ran out of memory")
        return y


def hadamard_rows(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """One :class:`NativeHadamard` call (sizes checked each time)."""
    return NativeHadamard(factor, x.shape[-1])(x)
