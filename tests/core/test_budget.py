"""The bit budget's numerics: stored bytes (against the packed module's own), the candidate
formats, and the allocation (never over budget, no worse than any uniform format that fits)."""

import itertools
import random

import pytest
import torch

from quantkit.core.budget import lower_hull, allocate, budget_bytes, candidate_specs, stored_bytes
from quantkit.core.quant import QuantSpec, quantize_rtn
from quantkit.errors import QuantkitError
from quantkit.runtime.qlinear import QuantLinear


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 64, True, False), (3, 32, False, False), (5, -1, True, True),
                                                        (2, 128, False, True), (6, 64, True, False), (8, -1, False, False)])
def test_stored_bytes_are_the_packed_modules_bytes(bits, group, sym, act_order):
    out_f, in_f = 24, 384
    spec = QuantSpec(bits, group, sym)
    q, s, z = quantize_rtn(torch.randn(out_f, in_f), spec)
    g_idx = torch.arange(in_f, dtype=torch.int32) // spec.groups_for(in_f) if act_order else None
    mod = QuantLinear.from_codes(q, s, z, bits, group, sym, g_idx=g_idx)
    assert stored_bytes(spec, out_f, in_f, g_idx=act_order) == mod.weight_bytes()


def test_candidates_take_only_group_sizes_that_divide_the_layer():
    groups = {s.group_size for s in candidate_specs(576, sym=True)}
    assert groups == {32, 64, -1}  # 128 and 256 do not divide 576
    assert {s.bits for s in candidate_specs(576, sym=True)} == {2, 3, 4, 5, 6, 8}
    assert all(not s.sym for s in candidate_specs(64, sym=False))
    assert {s.group_size for s in candidate_specs(64, sym=True)} == {32, -1}  # a group as wide as the layer is per channel


def test_budget_bytes_round_down_exactly():
    assert budget_bytes(3.5, 64) == 28
    assert budget_bytes(3.3, 10) == 4  # 33 bits: 4 whole bytes
    assert budget_bytes(0.1 + 0.2, 80) == 3  # 0.30000000000000004 * 80 / 8 = 3.0000000000000004 -> 3


def test_lower_hull_drops_dominated_and_non_convex_points():
    pts = [("a", 10, 10.0), ("b", 20, 4.0), ("c", 30, 3.5), ("d", 40, 0.5), ("e", 25, 9.0), ("f", 20, 5.0)]
    assert [p[0] for p in lower_hull(pts)] == ["a", "b", "d"]  # c is above the chord b-d, e and f are dominated


def _instance(rng, n):
    """Linears with realistic options: cost falling ~4x per bit, scaled by a random sensitivity."""
    options, weights = {}, {}
    for i in range(n):
        out_f, in_f = rng.choice([(16, 64), (32, 64), (64, 128)])
        sens = 10 ** rng.uniform(-2, 2)
        opts = []
        for spec in candidate_specs(in_f, sym=True):
            g = spec.groups_for(in_f)
            cost = sens * 4.0 ** (-spec.bits) * (1 + 0.3 * g / 64) * rng.uniform(0.8, 1.2)
            opts.append(((spec.bits, spec.group_size), stored_bytes(spec, out_f, in_f), cost))
        options[f"l{i}"], weights[f"l{i}"] = opts, out_f * in_f
    return options, weights


def _total(options, choice, idx):
    return sum(next(o for o in options[n] if o[0] == choice[n])[idx] for n in options)


@pytest.mark.parametrize("seed", range(6))
def test_allocation_fits_exactly_and_beats_every_uniform_format_that_fits(seed):
    rng = random.Random(seed)
    options, weights = _instance(rng, 12)
    n_weights = sum(weights.values())
    for budget in (2.2, 2.5, 3.0, 3.5, 4.25, 5.0, 8.6):
        choice = allocate(options, weights, budget)
        used = _total(options, choice, 1)
        assert 8 * used <= budget * n_weights
        cost = _total(options, choice, 2)
        for key in {o[0] for opts in options.values() for o in opts}:
            if all(any(o[0] == key for o in opts) for opts in options.values()):
                uniform = {n: key for n in options}
                if 8 * _total(options, uniform, 1) <= budget * n_weights:
                    assert cost <= _total(options, uniform, 2) * (1 + 1e-9), (budget, key)


def test_allocation_is_near_the_brute_force_optimum():
    rng = random.Random(7)
    options, weights = _instance(rng, 4)
    budget = 3.3
    best = min((dict(zip(options, keys)) for keys in itertools.product(*[[o[0] for o in options[n]] for n in options])
                if 8 * sum(next(o for o in options[n] if o[0] == k)[1] for n, k in zip(options, keys))
                <= budget * sum(weights.values())),
               key=lambda c: _total(options, c, 2))
    got = allocate(options, weights, budget)
    assert _total(options, got, 2) <= 1.25 * _total(options, best, 2)


def test_a_budget_below_the_smallest_formats_is_refused_in_one_line():
    options = {"a": [("x", 100, 1.0), ("y", 200, 0.5)]}
    with pytest.raises(QuantkitError, match="below the smallest formats") as e:
        allocate(options, {"a": 256}, 2.0)  # 100 bytes = 3.125 bits per weight at least
    assert "\n" not in str(e.value)


def test_a_fixed_linear_counts_in_the_budget_and_keeps_its_format():
    options = {"fixed": [("f8", 800, 0.0)], "free": [("lo", 100, 5.0), ("hi", 400, 1.0)]}
    assert allocate(options, {"fixed": 800, "free": 800}, 4.5) == {"fixed": "f8", "free": "lo"}  # 900 B fit, 1200 do not
    assert allocate(options, {"fixed": 800, "free": 800}, 6.0) == {"fixed": "f8", "free": "hi"}
