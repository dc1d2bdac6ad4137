"""Bits where they matter: one weight format per linear under a bits-per-weight budget
(``--target-bpw``; llama.cpp's ``--target-bpw``, AutoRound's AutoScheme, ModelOpt's AutoQuantize).

Bits per weight = 8 x (bytes of the quantized linears' codes, scales, zeros and g_idx, as
quantkit's checkpoint stores them: :func:`stored_bytes`) / (their number of weights).

Given, for every linear, candidate formats with their stored bytes and an estimated cost (what
the model's loss grows by when that linear alone takes the format), :func:`allocate` picks one
format per linear minimizing the summed cost with the stored bits at most the budget, exactly:
a multiple-choice knapsack, solved greedily along each linear's lower convex hull of (bytes,
cost) -- the optimum of its linear relaxation up to the last, partly fitting step -- then topped
up with the best single changes that still fit.

    >>> specs = candidate_specs(576, sym=True)                     # 2..8 bits x groups dividing 576
    >>> choice = allocate({"a": [(s, stored_bytes(s, 64, 576), c) for s, c in ...]}, {"a": 64 * 576}, 3.5)  # doctest: +SKIP
"""

from __future__ import annotations

import heapq
import math
from fractions import Fraction
from typing import Hashable

from quantkit.core.quant import QuantSpec
from quantkit.errors import QuantkitError

CANDIDATE_BITS = (2, 3, 4, 5, 6, 8)
CANDIDATE_GROUPS = (32, 64, 128, 256, -1)  # -1: per channel
TARGET_BPW_RANGE = (1.0, 16.0)  # what --target-bpw accepts; the candidates reach ~2.03 to ~8.5


def stored_bytes(spec: QuantSpec, out_features: int, in_features: int, g_idx: bool = False) -> int:
    """Bytes of one ``[out, in]`` linear in ``spec`` as quantkit's checkpoint stores it: codes
    bit-packed per row (``ceil(in * bits / 8)`` bytes), float16 scales and (asymmetric grids)
    uint8 zeros per group, and an int32 ``g_idx`` per input column when the method stores one."""
    n_groups = in_features // spec.groups_for(in_features)
    codes = out_features * ((in_features * spec.bits + 7) // 8)
    scales = out_features * n_groups * 2
    zeros = 0 if spec.sym else out_features * n_groups
    return codes + scales + zeros + (4 * in_features if g_idx else 0)


def candidate_specs(in_features: int, sym: bool, observer: str = "minmax", bits=CANDIDATE_BITS,
                    groups=CANDIDATE_GROUPS) -> list[QuantSpec]:
    """The formats a linear with ``in_features`` inputs may take: every width in ``bits`` with
    every group size in ``groups`` that divides ``in_features`` (per channel always)."""
    return [QuantSpec(b, g, sym, observer) for b in bits for g in groups
            if g == -1 or (g < in_features and in_features % g == 0)]


def budget_bytes(budget_bpw: float, n_weights: int) -> int:
    """The most bytes ``n_weights`` weights may take at ``budget_bpw`` bits each (rounded down, exactly)."""
    return math.floor(Fraction(budget_bpw) * n_weights / 8)


def lower_hull(options: list[tuple[Hashable, int, float]]) -> list[tuple[Hashable, int, float]]:
    """The lower convex hull of ``(key, bytes, cost)`` from the fewest bytes up, each step buying
    a lower cost at a falling price (cost saved per byte)."""
    best: dict[int, tuple] = {}
    for o in options:  # at equal bytes keep the cheapest
        if o[1] not in best or o[2] < best[o[1]][2]:
            best[o[1]] = o
    hull: list[tuple] = []
    for o in sorted(best.values(), key=lambda o: o[1]):
        if hull and o[2] >= hull[-1][2]:
            continue  # more bytes, no better
        while len(hull) >= 2:
            (_, b0, c0), (_, b1, c1) = hull[-2], hull[-1]
            if (c0 - c1) * (o[1] - b1) <= (c1 - o[2]) * (b1 - b0):  # the middle point is not below the chord
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def check_fits(options: dict[str, list[tuple[Hashable, int, float]]], weights: dict[str, int], budget_bpw: float) -> None:
    """Refuse a budget below the smallest formats of ``options`` (as :func:`allocate` takes them)."""
    used = sum(min(o[1] for o in opts) for opts in options.values())
    if used > budget_bytes(budget_bpw, sum(weights[n] for n in options)):
        least = 8 * used / max(sum(weights[n] for n in options), 1)
        raise QuantkitError(f"a budget of {budget_bpw:g} bits per weight is below the smallest formats here "
                            f"({least:.3f} bits per weight, scales included): raise --target-bpw")


def allocate(options: dict[str, list[tuple[Hashable, int, float]]], weights: dict[str, int],
             budget_bpw: float) -> dict[str, Hashable]:
    """One option per linear: ``options[name]`` is a list of ``(key, bytes, cost)``,
    ``weights[name]`` its number of weights.  Minimizes the summed cost with
    ``8 * sum(bytes) <= budget_bpw * sum(weights)``; refuses a budget below the smallest formats."""
    check_fits(options, weights, budget_bpw)
    names = list(options)
    cap = budget_bytes(budget_bpw, sum(weights[n] for n in names))
    smallest = {n: min(options[n], key=lambda o: (o[1], o[2])) for n in names}
    used = sum(o[1] for o in smallest.values())
    hulls = {n: lower_hull(options[n]) for n in names}
    chosen = {n: smallest[n] for n in names}
    pos = {n: 0 for n in names}
    heap: list[tuple[float, int, str]] = []

    def push(i: int, n: str) -> None:
        h = hulls[n]
        if pos[n] + 1 < len(h):
            (_, b0, c0), (_, b1, c1) = h[pos[n]], h[pos[n] + 1]
            heapq.heappush(heap, (-(c0 - c1) / (b1 - b0), i, n))

    for i, n in enumerate(names):
        chosen[n] = hulls[n][0]
        used += hulls[n][0][1] - smallest[n][1]
        push(i, n)
    while heap:  # the best price first; a step that does not fit ends that linear's climb
        _, i, n = heapq.heappop(heap)
        step = hulls[n][pos[n] + 1]
        if used + step[1] - chosen[n][1] <= cap:
            used += step[1] - chosen[n][1]
            chosen[n], pos[n] = step, pos[n] + 1
            push(i, n)
    while True:  # top up: the single change (any option) saving the most cost per byte that fits
        best = None
        for n in names:
            for o in options[n]:
                extra, saved = o[1] - chosen[n][1], chosen[n][2] - o[2]
                if saved > 0 and used + extra <= cap:
                    price = saved / extra if extra > 0 else math.inf
                    if best is None or price > best[0]:
                        best = (price, n, o)
        if best is None:
            break
        _, n, o = best
        used += o[1] - chosen[n][1]
        chosen[n] = o
    return {n: chosen[n][0] for n in names}
