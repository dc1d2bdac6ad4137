"""W4A8 / W4A4: QuantLinear with act_bits runs integer matmuls and computes what fake-quantized
activations times the dequantized weight give (its pure-torch reference)."""

from __future__ import annotations

import pytest
import torch

from quantkit.core.quant import QuantSpec, dequantize, quantize_rtn
from quantkit.errors import QuantkitError
from quantkit.methods.base import WeightQuantConfig
from quantkit.runtime.actquant import COUNTS, reset_counts
from quantkit.runtime.int8 import quantize_activations
from quantkit.runtime.qlinear import QuantLinear
from quantkit.runtime.swap import _check_entry


def _layer(act_bits, g_idx=None, sym=True, bits=4, seed=0, act_clip=1.0, group=32, **act):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 128, generator=g)
    spec = QuantSpec(bits, group, sym)
    q, s, z = quantize_rtn(w, spec)
    return QuantLinear.from_codes(q, s, z, bits, group, sym, g_idx=g_idx, bias=torch.randn(24, generator=g), act_bits=act_bits,
                                  act_clip=act_clip, **act)


def _reference(lin, x):
    """Fake quantization of x per token (and act_group_size columns): symmetric over clip * max|x|,
    or asymmetric over clip * [min, max] with 2^bits levels; then the dequantized weight, in float64."""
    x2 = x.reshape(-1, lin.in_features).double()
    gs = lin.in_features if lin.act_group_size == -1 else lin.act_group_size
    xg = x2.reshape(x2.shape[0], -1, gs)
    if lin.act_sym:
        qmax = 2 ** (lin.act_bits - 1) - 1
        scale = (xg.abs().amax(-1, keepdim=True) * lin.act_clip / qmax).clamp(min=1e-8)
        xq = torch.clamp(torch.round(xg / scale), -qmax, qmax) * scale
    else:
        levels = 2 ** lin.act_bits - 1
        lo = xg.amin(-1, keepdim=True).clamp(max=0) * lin.act_clip
        hi = xg.amax(-1, keepdim=True).clamp(min=0) * lin.act_clip
        scale = ((hi - lo) / levels).clamp(min=1e-8)
        zero = torch.round(-lo / scale)
        xq = (torch.clamp(torch.round(xg / scale) + zero, 0, levels) - zero) * scale
    w = dequantize(lin.codes(), lin.scales.float(), lin.zero_points(), lin.group_map()).double()
    return (xq.reshape(x2.shape) @ w.t() + lin.bias.double()).reshape(*x.shape[:-1], lin.out_features)


@pytest.mark.parametrize("act_bits,sym,clip", [(8, True, 1.0), (4, True, 1.0), (8, False, 1.0), (4, True, 0.8)])
def test_integer_path_matches_fake_quantized_reference(act_bits, sym, clip):
    lin = _layer(act_bits, sym=sym, act_clip=clip)
    x = torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(1))
    reset_counts()
    y = lin(x)
    assert y.shape == (3, 7, 24) and y.dtype == x.dtype
    assert torch.allclose(y.double(), _reference(lin, x), atol=1e-4, rtol=1e-4)
    assert COUNTS["int_matmuls"] == 4 and COUNTS["int_macs"] == 21 * 128 * 24  # one per group of 32


@pytest.mark.parametrize("act_bits,act_group,act_sym,wgroup,segments", [
    (4, 64, True, 32, 4), (4, 16, True, 32, 8), (4, -1, False, 32, 4), (4, 64, False, 32, 4), (8, 32, False, -1, 4),
    (4, 32, False, 64, 4)])
def test_grouped_and_asymmetric_activations_match_the_reference(act_bits, act_group, act_sym, wgroup, segments):
    """One integer matmul per run of columns sharing a weight group and an activation group; an
    asymmetric grid's zero point meets the weight's column sums."""
    lin = _layer(act_bits, group=wgroup, act_group_size=act_group, act_sym=act_sym)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1)) + 0.7  # off-centre: asymmetric grids matter
    reset_counts()
    y = lin(x)
    assert torch.allclose(y.double(), _reference(lin, x), atol=1e-4, rtol=1e-4)
    assert COUNTS["int_matmuls"] == segments
    lin.act_group_size, lin.act_sym = -1, True  # the settings reach the forward: another function now
    assert not torch.allclose(lin(x).double(), _reference(_layer(act_bits, group=wgroup, act_group_size=act_group,
                                                                 act_sym=act_sym), x), atol=1e-3)


def test_finer_and_asymmetric_activation_grids_err_less_on_skewed_inputs():
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(5)).abs() * torch.linspace(0.2, 3, 128)
    exact = _layer(None)(x)
    err = {k: ((_layer(4, **a)(x) - exact).norm() / exact.norm()).item() for k, a in
           {"token": {}, "group": {"act_group_size": 32}, "asym": {"act_sym": False},
            "both": {"act_group_size": 32, "act_sym": False}}.items()}
    assert err["both"] < err["group"] < err["token"] and err["both"] < err["asym"] < err["token"]


def test_grouped_activations_refuse_interleaved_weight_groups_and_8_bit_grids_reach_minus_128():
    g_idx = torch.randperm(128, generator=torch.Generator().manual_seed(2)) % 4
    with pytest.raises(QuantkitError, match="contiguous weight groups"):
        _layer(4, g_idx=g_idx, act_group_size=32)(torch.randn(2, 128))
    w = torch.tensor([[-1.0, 0.5, 0.2, 0.1] * 8])  # a symmetric 8-bit grid codes the group's -max as -128
    q, s, z = quantize_rtn(w, QuantSpec(8, -1, True))
    lin = QuantLinear.from_codes(q, s, z, 8, -1, True, act_bits=8)
    x = torch.randn(3, 32)
    assert torch.allclose(lin(x), x @ lin.dequantized_weight().t(), atol=0.05)


def test_unordered_groups_are_gathered():
    g_idx = torch.randperm(128, generator=torch.Generator().manual_seed(2)) % 4  # act-order, groups interleaved
    lin = _layer(8, g_idx=g_idx)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(lin(x).double(), _reference(lin, x), atol=1e-4, rtol=1e-4)


def test_w4a8_is_close_to_w4a16_and_w4a4_further():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    exact = _layer(None)(x)
    err = {b: ((_layer(b)(x) - exact).norm() / exact.norm()).item() for b in (8, 4)}
    assert err[8] < 0.01 < err[4] < 0.3
    clipped = ((_layer(4, act_clip=0.8)(x) - exact).norm() / exact.norm()).item()
    assert clipped < 0.95 * err[4]  # Gaussian rows: finer steps win over the few clipped values


def test_clipped_tokens_saturate_at_the_grid_ends():
    x = torch.tensor([[10.0, 5.0, -9.0, 0.5]])
    q, scale = quantize_activations(x, qmax=7, clip=0.5)
    assert torch.allclose(scale, torch.tensor([10.0 * 0.5 / 7]))
    assert q.tolist() == [[7, 7, -7, 1]]  # 0.5 / (5 / 7) = 0.7


def test_config_and_checkpoint_entries_are_checked():
    with pytest.raises(QuantkitError, match="8 or 4"):
        WeightQuantConfig(act_bits=3)
    with pytest.raises(QuantkitError, match="asymmetric 8-bit"):
        WeightQuantConfig(bits=8, sym=False, act_bits=8)
    entry = {"kind": "quant", "bits": 4, "group_size": 32, "sym": True}
    _check_entry("m", {**entry, "act_bits": 8}, 128, 24)
    for bad in (2, "8", 16.0):
        with pytest.raises(QuantkitError, match="act_bits"):
            _check_entry("m", {**entry, "act_bits": bad}, 128, 24)
    assert QuantLinear.from_entry(128, 24, {**entry, "act_bits": 4}, False, torch.float32).act_bits == 4
    for bad in (0, 1.5, -0.1, "0.9", True):
        with pytest.raises(QuantkitError, match="act_clip"):
            WeightQuantConfig(act_bits=4, act_clip=bad)
        with pytest.raises(QuantkitError, match="act_clip"):
            _check_entry("m", {**entry, "act_bits": 4, "act_clip": bad}, 128, 24)
    assert QuantLinear.from_entry(128, 24, {**entry, "act_bits": 4, "act_clip": 0.9}, False, torch.float32).act_clip == 0.9
    for bad in (0, -2, 48, 1.5, "64"):  # 48 does not divide 128
        with pytest.raises(QuantkitError, match="act_group_size"):
            _check_entry("m", {**entry, "act_bits": 4, "act_group_size": bad}, 128, 24)
    with pytest.raises(QuantkitError, match="act_group_size"):
        WeightQuantConfig(act_bits=4, act_group_size=0)
    with pytest.raises(QuantkitError, match="act_sym"):
        _check_entry("m", {**entry, "act_bits": 4, "act_sym": "no"}, 128, 24)
    lin = QuantLinear.from_entry(128, 24, {**entry, "act_bits": 4, "act_group_size": 64, "act_sym": False}, False, torch.float32)
    assert (lin.act_group_size, lin.act_sym) == (64, False)


def test_entries_name_only_the_settings_that_differ():
    from quantkit.core.types import QuantizedWeight

    q, s, z = quantize_rtn(torch.randn(4, 64), QuantSpec(4, 32))
    qw = QuantizedWeight(q, s, z, QuantSpec(4, 32), act_bits=4)
    assert {k for k in qw.config_entry() if k.startswith("act_")} == {"act_bits", "act_order"}
    qw.act_group_size, qw.act_sym, qw.act_clip = 32, False, 0.9
    e = qw.config_entry()
    assert (e["act_group_size"], e["act_sym"], e["act_clip"]) == (32, False, 0.9)
