"""Pricing a bit budget's candidate formats by the method's own result: block by block over the
calibration data, each linear quantized by the method (GPTQ) on its input Hessian and priced by
:func:`quantkit.calibrate.sensitivity.hessian_cost` (see :func:`hessian_prices`).

    >>> prices = hessian_prices(model, arch, calib_ids, 8, GPTQ(config), options, stats)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
from torch import nn

from quantkit.calibrate.driver import BlockContext, BlockMethod, _input_device, catch_block_inputs
from quantkit.calibrate.sensitivity import hessian_cost
from quantkit.core.budget import lower_hull
from quantkit.core.types import CompressionResult
from quantkit.models.arch import ArchSpec
from quantkit.models.moe import ExpertCalibration


def hessian_prices(model: nn.Module, arch: ArchSpec, calib_ids: torch.Tensor, batch_size: int, method: BlockMethod,
                   options: dict, stats: dict, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Better prices for a bit budget, block by block over the calibration data (float weights,
    one block's inputs held, as the run itself; one pass per block gives its Hessians and the
    next block's inputs).  For each block linear, the two formats on the
    lower convex hull of its first prices that bracket the budget (the last at most
    ``target_bpw`` bits per weight, the first above) are quantized by ``method.quantized_weight``
    on the linear's Hessian and priced by :func:`quantkit.calibrate.sensitivity.hessian_cost`; every
    other format's first price is scaled by the ratio measured / first price, interpolated in bits
    per weight between the two (how much of its rounding error the method takes back is a property
    of the linear, much as its inputs' correlations are).  Linears calibrated on fewer than twice
    as many tokens as they have inputs (GPTQ, fitted and priced on the same tokens, would look
    nearly free), experts the run will round to nearest (fewer routed tokens than
    ``expert_min_tokens``, without ``all_experts``) and the linears outside the blocks (the head)
    keep their first prices."""
    blocks = arch.blocks(model)
    inputs = catch_block_inputs(model, arch, calib_ids, batch_size, torch.device("cpu"))
    device = _input_device(model)
    budget, observer = method.config.target_bpw, method.config.observer
    out = {}
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        ctx = BlockContext(i, f"{arch.blocks_path}.{i}", block, arch, inputs, CompressionResult(), device)
        ctx.experts = ExpertCalibration(bool(getattr(method.config, "all_experts", False)),  # as the run will see them
                                        int(getattr(method.config, "expert_min_tokens", 0)))
        names = [n for n in arch.linear_names(block) if ctx.full_name(n) in options]
        with torch.no_grad():
            hessians = ctx.collect("hessian", [g for g in ctx.groups if set(g.linears) & set(names)], advance=True)
            for n in names:
                acc, full = hessians.get(n), ctx.full_name(n)
                if (acc is None or acc.n < 2 * acc.H.shape[0] or ctx.experts.starved(n, acc)
                        or len(options[full]) == 1):
                    continue  # too few tokens for its width (GPTQ would fit them and look free), or a fixed format
                w, f = ctx.weight(n), stats[full][0].to(device)
                ratios = []  # (bits per weight, measured / first price) at the references
                for spec, nbytes, first in _bracket(lower_hull(options[full]), budget, w.numel()):
                    w_hat = method.quantized_weight(w, acc, dataclasses.replace(spec, observer=observer))
                    if first > 0:
                        ratios.append((8 * nbytes / w.numel(), hessian_cost(w, w_hat, f, acc.H / 2) / first))  # H: 2 x^T x / n
                if ratios:
                    out[full] = [(s, nbytes, first * _interpolate(ratios, 8 * nbytes / w.numel()))
                                 for s, nbytes, first in options[full]]
        if progress is not None:
            progress(i + 1, len(blocks), f"pricing block {i} {time.perf_counter() - t0:.1f}s")
    return out


def _bracket(hull: list[tuple], budget: float, n_weights: int) -> list[tuple]:
    """The points of ``hull`` (``(spec, bytes, cost)`` by rising bytes) around ``budget`` bits per
    weight: the last at most it and the first above it (one of them at the ends)."""
    below = [o for o in hull if 8 * o[1] <= budget * n_weights]
    above = [o for o in hull if 8 * o[1] > budget * n_weights]
    return below[-1:] + above[:1]


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Linear between ``points`` (one or two ``(x, y)``, rising x), constant beyond them."""
    (x0, y0), (x1, y1) = points[0], points[-1]
    if x <= x0 or x1 == x0:
        return y0
    return y1 if x >= x1 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
