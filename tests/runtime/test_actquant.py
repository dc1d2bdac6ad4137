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


def _layer(act_bits, g_idx=None, sym=True, bits=4, seed=0, act_clip=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 128, generator=g)
    spec = QuantSpec(bits, 32, sym)
    q, s, z = quantize_rtn(w, spec)
    return QuantLinear.from_codes(q, s, z, bits, 32, sym, g_idx=g_idx, bias=torch.randn(24, generator=g), act_bits=act_bits,
                                  act_clip=act_clip)


def _reference(lin, x):
    """Per-token symmetric fake quantization of x (range clipped to act_clip of its max), then the
    dequantized weight, in float64."""
    qmax = 2 ** (lin.act_bits - 1) - 1
    x2 = x.reshape(-1, lin.in_features).double()
    scale = (x2.abs().amax(1, keepdim=True) * lin.act_clip / qmax).clamp(min=1e-8)
    xq = torch.clamp(torch.round(x2 / scale), -qmax, qmax) * scale
    w = dequantize(lin.codes(), lin.scales.float(), lin.zero_points(), lin.group_map()).double()
    return (xq @ w.t() + lin.bias.double()).reshape(*x.shape[:-1], lin.out_features)


@pytest.mark.parametrize("act_bits,sym,clip", [(8, True, 1.0), (4, True, 1.0), (8, False, 1.0), (4, True, 0.8)])
def test_integer_path_matches_fake_quantized_reference(act_bits, sym, clip):
    lin = _layer(act_bits, sym=sym, act_clip=clip)
    x = torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(1))
    reset_counts()
    y = lin(x)
    assert y.shape == (3, 7, 24) and y.dtype == x.dtype
    assert torch.allclose(y.double(), _reference(lin, x), atol=1e-4, rtol=1e-4)
    assert COUNTS["int_matmuls"] == 4 and COUNTS["int_macs"] == 21 * 128 * 24  # one per group of 32


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
