"""Low-bit activations for weight-quantized linears (W4A8, W4A4; QuaRot): a :class:`QuantLinear`
with ``act_bits`` quantizes its input per token to ``act_bits`` (symmetric, codes in int8
storage) and computes ``x @ W^T`` as integer matmuls, one per weight group:

    y[m, n] = x_scale[m] * sum_g w_scale[n, g] * (x_int[m, cols_g] . w_int[n, cols_g])

``w_int = codes - zero`` (integers in int8 storage: ``[-2^(b-1), 2^(b-1) - 1]`` for a symmetric
b-bit grid), each group's ``x_int . w_int`` an int8 x int8 -> int32 product on
:func:`quantkit.runtime.backends.int8_matmul` (``torch._int_mm`` on CPU, Triton on CUDA, an
exact reference elsewhere).  No path dequantizes the weight to float.  :data:`COUNTS` counts the
integer matmuls and their multiply-adds, so a benchmark can show they ran.

    >>> lin = QuantLinear.from_codes(q, s, z, 4, 64, True, act_bits=8)
    >>> y = lin(x)                     # per-token int8 activations, int4 weights, int32 sums
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.runtime.backends import int8_matmul
from quantkit.runtime.int8 import quantize_activations

COUNTS = {"int_matmuls": 0, "int_macs": 0}  # integer matmuls run (and multiply-adds), process-wide


def reset_counts() -> None:
    COUNTS.update(int_matmuls=0, int_macs=0)


def integer_weight(module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(w_int [N, K] int8 with its columns in group order, column order or None, group starts
    [G + 1])`` of a QuantLinear, converted once and kept on the module."""
    cached = getattr(module, "_int_weight", None)
    if cached is not None:
        return cached
    groups = module.group_map().long()
    w = (module.codes().float() - module.zero_points()[:, groups]).round()
    order = None
    if module.g_idx is not None and bool((groups[1:] < groups[:-1]).any()):  # act-order without static groups
        order = torch.argsort(groups, stable=True)
        w, groups = w[:, order], groups[order]
    starts = torch.searchsorted(groups, torch.arange(module.scales.shape[1] + 1, device=groups.device))
    if w.numel() and w.abs().max() > 127:
        raise QuantkitError(f"integer activations need the weight's integers in int8; this {module.bits}-bit grid has "
                            f"{int(w.abs().max())}")
    module._int_weight = (w.to(torch.int8).contiguous(), order, starts.tolist())
    return module._int_weight


def act_quant_forward(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with ``x`` quantized per token to ``module.act_bits`` (see the module docstring)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features)
    w_int, order, starts = integer_weight(module)
    if order is not None:
        x2 = x2[:, order]
    x_int, x_scale = quantize_activations(x2, qmax=2 ** (module.act_bits - 1) - 1, clip=module.act_clip)
    ones = torch.ones_like(x_scale)
    y = None
    for g in range(len(starts) - 1):
        a, b = starts[g], starts[g + 1]
        part = int8_matmul(x_int[:, a:b].contiguous(), w_int[:, a:b].contiguous(), ones, module.scales[:, g],
                           out_dtype=torch.float32)
        y = part if y is None else y + part
    COUNTS["int_matmuls"] += len(starts) - 1
    COUNTS["int_macs"] += x2.shape[0] * module.in_features * module.out_features
    y = y * x_scale.unsqueeze(1)
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype).reshape(*lead, module.out_features)
