"""Low-bit activations for weight-quantized linears (W4A8, W4A4; QuaRot): a :class:`QuantLinear`
with ``act_bits`` quantizes its input per token to ``act_bits`` (codes in int8 storage), with one
scale per token (``act_group_size`` -1) or per token and group of columns, symmetric or
(``act_sym`` False) with a zero point, and computes ``x @ W^T`` as integer matmuls, one per
segment of columns sharing a weight group and an activation group:

    x[m, cols_a] ~= x_scale[m, a] * (x_int[m, cols_a] + x_off[m, a])
    y[m, n] = sum_seg x_scale[m, a] * w_scale[n, g] * (x_int[m, seg] . w_int[n, seg] + x_off[m, a] * sum(w_int[n, seg]))

``w_int = codes - zero`` (integers in int8 storage: ``[-2^(b-1), 2^(b-1) - 1]`` for a symmetric
b-bit grid), each ``x_int . w_int`` an int8 x int8 -> int32 product on
:func:`quantkit.runtime.backends.int8_matmul` (``torch._int_mm`` on CPU, Triton on CUDA, an
exact reference elsewhere); an asymmetric grid's zero point ``x_off`` (0 when symmetric) meets the
weight's column sums, computed once.  No path dequantizes the weight to float.  :data:`COUNTS`
counts the integer matmuls and their multiply-adds, so a benchmark can show they ran.

    >>> lin = QuantLinear.from_codes(q, s, z, 4, 64, True, act_bits=8)
    >>> y = lin(x)                     # per-token int8 activations, int4 weights, int32 sums
"""

from __future__ import annotations

import torch

from quantkit.core.quant import quantize_tokens
from quantkit.errors import QuantkitError
from quantkit.runtime.backends import int8_matmul

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
    if w.numel() and (w.min() < -128 or w.max() > 127):
        raise QuantkitError(f"integer activations need the weight's integers in int8; this {module.bits}-bit grid has "
                            f"{int(w.min())} .. {int(w.max())}")
    module._int_weight = (w.to(torch.int8).contiguous(), order, starts.tolist())
    return module._int_weight


def _segments(module, starts: list[int]) -> list[tuple[int, int, int, int, torch.Tensor | None]]:
    """``(start, end, weight group, activation group, sum of w_int over the columns or None)`` of
    each run of columns sharing both groups; kept on the module with the integer weight."""
    key = (module._int_weight, module.act_group_size, module.act_sym)
    cached = getattr(module, "_act_segments", None)
    if cached is not None and cached[0][0] is key[0] and cached[0][1:] == key[1:]:
        return cached[1]
    w_int = module._int_weight[0]
    ag = module.in_features if module.act_group_size == -1 else module.act_group_size
    cuts = sorted(set(starts) | set(range(0, module.in_features + 1, ag)))
    segs = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        gw = max(i for i in range(len(starts) - 1) if starts[i] <= a)
        wsum = None if module.act_sym else w_int[:, a:b].sum(1, dtype=torch.int32).float()  # [N]
        segs.append((a, b, gw, a // ag, wsum))
    module._act_segments = (key, segs)
    return segs


def act_quant_forward(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with ``x`` quantized per token to ``module.act_bits`` (see the module docstring)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features)
    w_int, order, starts = integer_weight(module)
    if order is not None:
        if module.act_group_size != -1:  # a segment would mix activation groups: no one scale to factor out
            raise QuantkitError("act_group_size needs contiguous weight groups; this layer's act-order g_idx interleaves "
                                "them (quantize with static groups)")
        x2 = x2[:, order]
    x_int, x_scale, x_off = quantize_tokens(x2, module.act_bits, module.act_clip, module.act_group_size, module.act_sym)
    ones = torch.ones(x2.shape[0], dtype=torch.float32, device=x2.device)
    segs = _segments(module, starts)
    y = None
    for a, b, gw, ga, wsum in segs:
        part = int8_matmul(x_int[:, a:b].contiguous(), w_int[:, a:b].contiguous(), ones, module.scales[:, gw],
                           out_dtype=torch.float32)  # [M, N]: w_scale[n] * (x_int . w_int)
        if wsum is not None:
            part = part + x_off[:, ga:ga + 1] * (wsum * module.scales[:, gw].float()).unsqueeze(0)
        if x_scale.shape[1] > 1:
            part = part * x_scale[:, ga:ga + 1]
        y = part if y is None else y + part
    COUNTS["int_matmuls"] += len(segs)
    COUNTS["int_macs"] += x2.shape[0] * module.in_features * module.out_features
    if x_scale.shape[1] == 1:
        y = y * x_scale
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype).reshape(*lead, module.out_features)
