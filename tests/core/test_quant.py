import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.core.quant import FP16_MAX, QuantSpec, clipped_scale_note, dequantize, quantize_rtn, sqnr_db


@pytest.mark.parametrize("bits,floor_db", [(8, 40.0), (4, 17.0), (3, 11.0), (2, 4.0)])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_clears_sqnr_floor(bits, floor_db, sym):
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    spec = QuantSpec(bits, 32, sym)
    q, s, z = quantize_rtn(w, spec)
    assert q.max() <= spec.maxq
    assert s.shape == (32, 4) and z.shape == (32, 4)
    assert sqnr_db(w, dequantize(q, s, z, 32)) > floor_db


def test_symmetric_zero_point_is_mid_grid():
    q, s, z = quantize_rtn(torch.randn(4, 16), QuantSpec(4, -1, True))
    assert torch.all(z == 8)


def test_per_channel_groups_cover_whole_row():
    q, s, z = quantize_rtn(torch.randn(4, 48), QuantSpec(4, -1, False))
    assert s.shape == (4, 1)


def test_scales_are_on_the_float16_grid():
    _, s, _ = quantize_rtn(torch.randn(8, 64), QuantSpec(4, 16))
    assert torch.equal(s, s.half().float())


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(group_size=0), dict(group_size=-2)])
def test_bad_specs_are_refused(bad):
    with pytest.raises(QuantkitError):
        QuantSpec(**bad)


def test_group_size_must_divide_layer():
    with pytest.raises(QuantkitError, match="does not divide layer.x's 100 input features"):
        QuantSpec(4, 64).check_layer("layer.x", 100)


def test_a_scale_beyond_float16_is_clamped_and_noted():  # A45
    w = torch.randn(4, 64) * 0.02
    w[1, 5] = 1e6
    q, s, z = quantize_rtn(w, QuantSpec(4, 32, True))
    assert s[1, 0] == FP16_MAX and float(dequantize(q, s, z, 32)[1, 5]) == 7 * FP16_MAX  # 1e6 stored as 458528
    assert clipped_scale_note(s) == ("weights beyond float16's scale range: 1 group scale(s) clamped at 65504, "
                                     "their largest weights clipped (a recipe's ignore: keeps the module in float)")
    assert clipped_scale_note(quantize_rtn(w[[0, 2, 3]], QuantSpec(4, 32, True))[1]) == ""


@pytest.mark.parametrize("bits,sym", [(3, True), (3, False), (4, True), (2, False)])
def test_mse_observer_never_rounds_a_group_worse_and_usually_better(bits, sym):
    from quantkit.core.quant import MSE_NORM, compute_qparams, fake_quantize

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(256, 64, generator=g) * torch.rand(256, 1, generator=g)
    w[::7, 3] *= 6  # outliers: where a shrunk range pays
    err = {}
    for obs in ("minmax", "mse"):
        spec = QuantSpec(bits, 64, sym, obs)
        s, z = compute_qparams(w, spec)
        err[obs] = (fake_quantize(w, s.unsqueeze(1), z.unsqueeze(1), spec.maxq) - w).abs().pow(MSE_NORM).sum(1)
        assert torch.equal(s, s.half().float())  # still on the float16 grid
    assert bool((err["mse"] <= err["minmax"] + 1e-6).all())
    assert err["mse"].sum() < 0.9 * err["minmax"].sum()
    q, s, z = quantize_rtn(w, QuantSpec(bits, 64, sym, "mse"))
    assert q.max() <= 2 ** bits - 1


def test_unknown_observer_is_refused():
    with pytest.raises(QuantkitError, match="observer must be one of minmax, mse, imatrix-mse"):
        QuantSpec(4, 64, True, "percentile")


def test_imatrix_mse_weighs_the_important_columns():
    from quantkit.core.quant import MSE_NORM, compute_qparams, fake_quantize

    g = torch.Generator().manual_seed(5)
    w = torch.randn(256, 64, generator=g)
    w[:, 0] *= 4  # a large column ...
    imp = torch.ones(64)
    imp[1:9] = 50.0  # ... and eight whose inputs are large: their rounding matters more
    spec = QuantSpec(3, 64, False, "imatrix-mse")
    assert all(torch.equal(a, b) for a, b in zip(compute_qparams(w, spec), compute_qparams(w, QuantSpec(3, 64, False, "mse"))))
    err = {}
    for name, importance in (("mse", None), ("imatrix", imp)):
        s, z = compute_qparams(w, spec, importance)
        err[name] = ((fake_quantize(w, s.unsqueeze(1), z.unsqueeze(1), spec.maxq) - w).abs().pow(MSE_NORM) * imp).sum(1)
    assert bool((err["imatrix"] <= err["mse"] + 1e-5).all()) and err["imatrix"].sum() < 0.97 * err["mse"].sum()
    s, z = compute_qparams(w, spec, imp * 1000)  # only the relative importance counts
    assert torch.equal(s, compute_qparams(w, spec, imp)[0])
