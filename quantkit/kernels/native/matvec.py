"""The bf16 matrix-vector product of quantkit's native CPU kernels (``kernels/matvec.c``): an
unquantized bf16 ``lm_head`` at decode (PyTorch's reads ~9 GB/s on a CPU; this streams its rows
with ``vdpbf16ps``).

    >>> logits = bf16_matvec(h, head.weight)   # doctest: +SKIP   h [K] -> float32 [vocab]
"""

from __future__ import annotations

import torch

from quantkit.kernels.native.build import library


def bf16_matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [K]`` -> ``w [N, K] (bf16, contiguous) @ x`` as float32 ``[N]``: x rounded to bf16, float32
    sums (what ``F.linear`` computes in bf16, without its bf16 rounding of the output)."""
    xb = x.to(torch.bfloat16).contiguous()
    y = torch.empty(w.shape[0], dtype=torch.float32)
    library().qk_bf16_matvec(w.data_ptr(), xb.data_ptr(), y.data_ptr(), w.shape[0], w.shape[1], torch.get_num_threads())
    return y
