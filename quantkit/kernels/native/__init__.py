"""quantkit's native CPU kernels: C sources in the repository's ``kernels/`` (``qk.h``,
``int4_gemm.c``, ``decode_step.c``, ``matvec.c``, ``hadamard.c``), built on first use into one cached
shared object per instruction set (AVX-512 BF16, else AVX2 + FMA + F16C; ``hadamard.c`` also
alone, for any CPU) and called through ctypes.

* :mod:`~quantkit.kernels.native.build`: CPU check, compiler, cache, loading, the C signatures;
* :mod:`~quantkit.kernels.native.int4`: the int4 layout, matmul and exact dequantization;
* :mod:`~quantkit.kernels.native.matvec`: the bf16 matrix-vector product (a bf16 ``lm_head``);
* :mod:`~quantkit.kernels.native.hadamard`: the online Hadamard transform of rotated models (portable C);
* :mod:`~quantkit.kernels.native.decode`: the call of one whole decode step (its plan is the
  runtime's, :mod:`quantkit.runtime.native_decode`).

    >>> w = int4_weight(q, scales, zeros, perm=None, group_size=64)   # doctest: +SKIP
    >>> y = int4_matmul(x, w)                                          # x [..., K] -> [..., N]
"""

from __future__ import annotations

from quantkit.kernels.native.build import NativeUnavailable, available, library
from quantkit.kernels.native.hadamard import NativeHadamard, hadamard_available, hadamard_rows
from quantkit.kernels.native.int4 import NativeInt4Weight, dequantize_rows, int4_matmul, int4_weight
from quantkit.kernels.native.matvec import bf16_matvec

__all__ = ["NativeUnavailable", "available", "library", "NativeHadamard", "hadamard_available", "hadamard_rows", "NativeInt4Weight", "dequantize_rows", "int4_matmul",
           "int4_weight", "bf16_matvec"]
