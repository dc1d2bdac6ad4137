import pytest
import torch

from quantkit.api import compress
from quantkit.errors import QuantkitError
from quantkit.methods.magnitude import magnitude_prune
from quantkit.methods.rtn import rtn_linear
from quantkit.methods.sparsegpt import SparseGPTConfig, sparsegpt_prune
from quantkit.methods.wanda import wanda_prune
from quantkit.core.hessian import HessianAccumulator
from quantkit.core.quant import QuantSpec, dequantize
from quantkit.testing import outlier_layer
from quantkit.testing import output_error as _out_err
from quantkit.core.sparsity import SparsityTarget, n_pruned, nm_valid
from quantkit.core.stats import ActStats


def _outlier_layer(seed=0, **kw):
    """A toy layer with planted outlier channels and correlated inputs, and its Hessian."""
    w, x = outlier_layer(seed, **kw)
    h = HessianAccumulator(x.shape[1])
    h.add(x)
    return w, x, h.H


def _kw(target: SparsityTarget) -> dict:
    return {"nm": target.nm} if target.nm else {"sparsity": target.sparsity}


TARGETS = [SparsityTarget(0.5), SparsityTarget(0.7), SparsityTarget(0.5, (2, 4)), SparsityTarget(0.5, (4, 8)),
           SparsityTarget(0.75, (1, 4))]


@pytest.mark.parametrize("target", TARGETS, ids=SparsityTarget.describe)
def test_sparsegpt_beats_magnitude_and_wanda_on_outlier_layer(target):
    w, x, H = _outlier_layer()
    w_hat, mask, qw, loss = sparsegpt_prune(w, H, **_kw(target), blocksize=48)
    w_mag, _, _ = magnitude_prune(w, target)
    stats = ActStats(w.shape[1])
    stats.add(x)
    w_wanda, _, _ = wanda_prune(w, stats.l2_norm, target)
    assert qw is None and loss > 0
    assert _out_err(x, w, w_hat) < 0.5 * _out_err(x, w, w_mag)
    assert _out_err(x, w, w_hat) <= _out_err(x, w, w_wanda)


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("in_f,blocksize", [(128, 128), (100, 32), (96, 7)])
def test_unstructured_sparsity_is_exact(sparsity, in_f, blocksize):
    w, x, H = _outlier_layer(seed=1, out_f=24, in_f=in_f)
    w_hat, mask, _, _ = sparsegpt_prune(w, H, sparsity=sparsity, blocksize=blocksize)
    assert int(mask.sum()) == n_pruned(w.numel(), sparsity)
    assert (w_hat[mask] == 0).all() and (w_hat[~mask] != 0).all()


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (3, 5), (1, 2)])
@pytest.mark.parametrize("blocksize", [128, 48, 7])
def test_nm_groups_are_valid(nm, blocksize):
    n, m = nm
    w, x, H = _outlier_layer(seed=2, out_f=16, in_f=120)
    w_hat, mask, _, _ = sparsegpt_prune(w, H, nm=nm, blocksize=blocksize)
    assert nm_valid(w_hat, n, m)
    per_group = mask.reshape(16, -1, m).sum(-1)
    assert torch.equal(per_group, torch.full_like(per_group, m - n))  # exactly m - n pruned per group
    assert (w_hat[mask] == 0).all()


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(3, -1, False), QuantSpec(4, 64, True)])
@pytest.mark.parametrize("target", [SparsityTarget(0.5), SparsityTarget(0.5, (2, 4))], ids=SparsityTarget.describe)
def test_joint_quantization_keeps_zeros_and_beats_prune_then_rtn(spec, target):
    w, x, H = _outlier_layer(seed=3)
    w_hat, mask, qw, _ = sparsegpt_prune(w, H, **_kw(target), blocksize=48, spec=spec)
    assert torch.equal(dequantize(qw.q, qw.scales, qw.zeros, spec.groups_for(w.shape[1])), w_hat)
    assert int(mask.sum()) == w.numel() // 2 and (w_hat[mask] == 0).all()
    if target.nm:
        assert nm_valid(w_hat, *target.nm)
    w_mag, _, _ = magnitude_prune(w, target)
    _, w_mag_rtn, _, _, _ = rtn_linear(w_mag, None, spec)
    assert _out_err(x, w, w_hat) < 0.5 * _out_err(x, w, w_mag_rtn)


def test_dead_inputs_are_pruned_first_and_do_not_crash():
    w, x, _ = _outlier_layer(seed=4)
    x[:, 10:14] = 0
    h = HessianAccumulator(w.shape[1])
    h.add(x)
    w_hat, mask, _, _ = sparsegpt_prune(w, h.H, sparsity=0.5)
    assert torch.isfinite(w_hat).all() and mask[:, 10:14].all()


def test_singular_hessian_reports_failure():
    assert sparsegpt_prune(torch.randn(8, 16), -torch.eye(16), sparsity=0.5) is None


def test_sparsegpt_is_deterministic():
    w, x, H = _outlier_layer(seed=5)
    a = sparsegpt_prune(w, H, sparsity=0.5, spec=QuantSpec(4, 32))
    b = sparsegpt_prune(w, H, sparsity=0.5, spec=QuantSpec(4, 32))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2].q, b[2].q)


@pytest.mark.parametrize("kwargs,message", [
    ({"sparsity": 1.5}, "sparsity must be a fraction in (0, 1)"),
    ({"sparsity": 0.0}, "sparsity must be a fraction in (0, 1)"),
    ({"pattern": "3:2"}, "0 < N < M"),
    ({"pattern": "0:4"}, "0 < N < M"),
    ({"pattern": "2-4"}, "must look like N:M"),
    ({"sparsity": 0.5, "pattern": "2:4"}, "not both"),
    ({"packed": True}, "needs an N:M pattern"),
    ({"pattern": "2:4", "packed": True, "bits": 4}, "--packed"),
    ({"bits": 9}, "bits must be"),
    ({"damp": 0}, "damp must be"),
    ({"ignore": ("(",)}, "bad ignore pattern"),
    ({"overrides": ((r"down_proj", {"bits": 4}),)}, "override for"),
    ({"overrides": ((r"down_proj", {"sparsity": 2}),)}, "sparsity must be"),
])
def test_config_refuses_bad_input(kwargs, message):
    with pytest.raises(QuantkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SparseGPTConfig(**kwargs)


def test_per_module_overrides_and_log_on_a_model(stories, calib_ids):
    model, tok = stories
    cfg = SparseGPTConfig(sparsity=0.5, overrides=((r"layers\.[1-3]\.mlp\.down_proj", {"sparsity": 0}),
                                                   (r"self_attn\.[qk]_proj", {"pattern": "2:4"}),
                                                   (r"layers\.0\.", {"sparsity": 0.3})), ignore=(r"layers\.4\.mlp\.down_proj",))
    res = compress(model, "sparsegpt", cfg, calib_ids=calib_ids)
    recs = {r.module: r for r in res.log}
    assert len(recs) == 35
    for name, rec in recs.items():
        w = model.get_submodule(name).weight
        zeros = float((w == 0).float().mean())
        if ".layers.0." in name:
            assert rec.sparsity == pytest.approx(n_pruned(w.numel(), 0.3) / w.numel())
        elif "down_proj" in name:
            assert rec.sparsity == 0.0 and zeros == 0.0 and "left dense" in rec.note
        else:
            assert rec.sparsity == 0.5 and zeros == 0.5
            if "q_proj" in name or "k_proj" in name:
                assert nm_valid(w, 2, 4)
    sp = res.extra["sparsity"]
    assert sp["modules"] == 35 - 4 and sp["max"] == 0.5 and sp["min"] < 0.31
