import pytest
import torch

from quantkit.methods.gptq import gptq_quantize
from quantkit.methods.rtn import rtn_linear
from quantkit.core.hessian import HessianAccumulator
from quantkit.core.quant import QuantSpec, dequantize
from quantkit.testing import outlier_layer
from quantkit.testing import output_error as _out_err


def _outlier_layer(seed=0, **kw):
    """A toy layer with planted outlier channels and correlated inputs, and its Hessian."""
    w, x = outlier_layer(seed, **kw)
    h = HessianAccumulator(x.shape[1])
    h.add(x)
    return w, x, h.H


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(3, 32, False), QuantSpec(4, -1, False), QuantSpec(2, 64, False)])
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_beats_rtn_on_outlier_layer(spec, act_order, static):
    w, x, H = _outlier_layer()
    qw, w_hat, loss, damp = gptq_quantize(w, H, spec, blocksize=48, act_order=act_order, static_groups=static)
    _, w_rtn, _, _, _ = rtn_linear(w, None, spec)
    assert _out_err(x, w, w_hat) < 0.9 * _out_err(x, w, w_rtn)


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_codes_and_grid_reproduce_its_weight(act_order, static):
    w, x, H = _outlier_layer(seed=1)
    spec = QuantSpec(4, 32, False)
    qw, w_hat, _, _ = gptq_quantize(w, H, spec, act_order=act_order, static_groups=static)
    g = qw.g_idx if qw.g_idx is not None else 32
    assert torch.equal(dequantize(qw.q, qw.scales, qw.zeros, g), w_hat)
    assert (qw.g_idx is not None) == (act_order and not static)
    if qw.g_idx is not None:  # every group holds exactly group_size columns
        assert torch.equal(torch.bincount(qw.g_idx.long()), torch.full((4,), 32))


def test_dead_inputs_are_zeroed_and_do_not_crash():
    w, x, H = _outlier_layer(seed=2)
    x[:, 10] = 0
    h = HessianAccumulator(w.shape[1])
    h.add(x)
    qw, w_hat, loss, damp = gptq_quantize(w, h.H, QuantSpec(4, 32, True))
    assert torch.isfinite(w_hat).all() and loss >= 0
    assert torch.all(w_hat[:, 10] == 0) and torch.all(qw.q[:, 10] == 8)  # the dead column is the grid's zero
    assert (w_hat[:, :10] != 0).float().mean() > 0.5  # the live columns keep their weights


def test_singular_hessian_raises_damping_or_reports_failure():
    w = torch.randn(8, 16)
    H = -torch.eye(16)  # never positive definite
    assert gptq_quantize(w, H, QuantSpec(4, 16)) is None


def test_default_is_act_order_with_static_groups():
    """The default (llm-compressor's "static" ordering): contiguous groups, so no g_idx is stored,
    and a different result from natural column order."""
    from quantkit import api
    from quantkit.methods.gptq import GPTQConfig
    from quantkit.testing import tiny_llama

    assert GPTQConfig().act_order and GPTQConfig().static_groups
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    res = api.compress(tiny_llama(0), "gptq", {"bits": 4, "group_size": 32}, calib_ids=ids)
    assert all(q.g_idx is None for q in res.quantized.values())
    assert res.extra["config"]["act_order"] is True
    w, x, H = _outlier_layer(seed=5)
    ordered = gptq_quantize(w, H, QuantSpec(4, 32), act_order=True, static_groups=True)[0]
    natural = gptq_quantize(w, H, QuantSpec(4, 32))[0]
    assert ordered.g_idx is None and not torch.equal(ordered.q, natural.q)


def test_no_act_order_is_classic_gptq_whatever_static_groups_says():
    """Static groups belong to the act-order default: with act_order off, each group's grid is set
    when its first column is reached (classic GPTQ), as `--no-act-order` promises."""
    from quantkit import api
    from quantkit.testing import tiny_llama

    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    runs = [api.compress(tiny_llama(0), "gptq", {"bits": 4, "group_size": 16, "act_order": False, "static_groups": s},
                         calib_ids=ids) for s in (True, False)]
    for name, q in runs[0].quantized.items():
        assert torch.equal(q.q, runs[1].quantized[name].q) and torch.equal(q.scales, runs[1].quantized[name].scales)
    core = [gptq_quantize(*_outlier_layer(seed=7)[::2], QuantSpec(4, 32), static_groups=s)[0] for s in (True, False)]
    assert not torch.equal(core[0].scales, core[1].scales)  # the core itself does tell them apart


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_imatrix_mse_grids_follow_the_hessian_diagonal(act_order, static):
    """GPTQ hands each group's columns' diag(H) to the imatrix-mse observer: its output error is no
    worse than plain mse's here, the grids differ from it, and the codes still reproduce the weight."""
    w, x, H = _outlier_layer(seed=2)
    out = {}
    for obs in ("mse", "imatrix-mse"):
        qw, w_hat, _, _ = gptq_quantize(w, H, QuantSpec(3, 32, False, obs), act_order=act_order, static_groups=static)
        g = qw.g_idx if qw.g_idx is not None else 32
        assert torch.equal(dequantize(qw.q, qw.scales, qw.zeros, g), w_hat)
        out[obs] = (qw, _out_err(x, w, w_hat))
    assert not torch.equal(out["mse"][0].scales, out["imatrix-mse"][0].scales)
    assert out["imatrix-mse"][1] < 1.05 * out["mse"][1]


def test_imatrix_mse_is_refused_where_no_statistics_are_collected():
    from quantkit.errors import QuantkitError
    from quantkit.methods.awq import AWQConfig, AWQGPTQConfig
    from quantkit.methods.gptq import GPTQConfig
    from quantkit.methods.rtn import RTNConfig

    GPTQConfig(observer="imatrix-mse")
    AWQGPTQConfig(observer="imatrix-mse")
    for cls in (RTNConfig, AWQConfig):
        with pytest.raises(QuantkitError, match="imatrix-mse weighs columns by calibration statistics"):
            cls(observer="imatrix-mse")
