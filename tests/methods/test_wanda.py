"""Wanda and magnitude pruning, and the shared mask helpers they use."""

import pytest
import torch

from quantkit.api import compress
from quantkit.errors import QuantkitError
from quantkit.methods.magnitude import magnitude_prune
from quantkit.methods.wanda import wanda_prune, wanda_scores
from quantkit.core.sparsity import SparsityTarget, n_pruned, nm_mask, nm_valid, parse_pattern, topk_mask
from quantkit.core.stats import ActStats
from quantkit.testing import outlier_layer
from quantkit.testing import output_error as _out_err


def _outlier_layer(seed=0, out_f=32, in_f=128, tokens=512):
    """Outlier channels, uncorrelated inputs: small weights there still matter."""
    w, x = outlier_layer(seed, out_f=out_f, in_f=in_f, tokens=tokens, correlated=False)
    stats = ActStats(in_f)
    stats.add(x)
    return w, x, stats


def test_wanda_score_is_weight_times_input_norm():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    x = torch.tensor([[3.0, 0.0, 1.0, 0.5], [4.0, 1.0, 0.0, 0.5]])  # column norms 5, 1, 1, 0.7071
    stats = ActStats(4)
    stats.add(x)
    assert torch.allclose(stats.l2_norm, torch.tensor([5.0, 1.0, 1.0, 0.5**0.5]))
    assert torch.allclose(wanda_scores(w, stats.l2_norm), torch.tensor([[5.0, 2.0, 3.0, 4 * 0.5**0.5]]))
    w_hat, mask, _ = wanda_prune(w, stats.l2_norm, SparsityTarget(0.5))
    assert mask.tolist() == [[False, True, False, True]]  # |w| alone would prune columns 0 and 1
    assert w_hat.tolist() == [[1.0, 0.0, 3.0, 0.0]]


@pytest.mark.parametrize("target", [SparsityTarget(0.5), SparsityTarget(0.5, (2, 4)), SparsityTarget(0.5, (4, 8))],
                         ids=SparsityTarget.describe)
def test_wanda_beats_magnitude_on_outlier_layer(target):
    w, x, stats = _outlier_layer()
    w_wanda, _, _ = wanda_prune(w, stats.l2_norm, target)
    w_mag, _, _ = magnitude_prune(w, target)
    assert _out_err(x, w, w_wanda) < 0.7 * _out_err(x, w, w_mag)


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.6, 0.9])
def test_wanda_prunes_exactly_per_row_and_magnitude_per_layer(sparsity):
    w, x, stats = _outlier_layer(seed=1, in_f=100)
    _, mask, _ = wanda_prune(w, stats.l2_norm, SparsityTarget(sparsity))
    assert torch.equal(mask.sum(1), torch.full((32,), n_pruned(100, sparsity)))
    w_hat, mask, _ = magnitude_prune(w, SparsityTarget(sparsity))
    assert int(mask.sum()) == n_pruned(w.numel(), sparsity) and (w_hat[mask] == 0).all()
    assert float(w.abs()[mask].max()) <= float(w.abs()[~mask].min())  # the smallest of the layer


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8), (1, 2), (5, 16)])
def test_nm_masks_are_valid_for_any_pattern(n, m):
    w, x, stats = _outlier_layer(seed=2, in_f=16 * 6)
    for w_hat, mask, _ in (wanda_prune(w, stats.l2_norm, SparsityTarget(1 - n / m, (n, m))),
                           magnitude_prune(w, SparsityTarget(1 - n / m, (n, m)))):
        assert nm_valid(w_hat, n, m)
        per_group = mask.reshape(32, -1, m).sum(-1)
        assert torch.equal(per_group, torch.full_like(per_group, m - n))


def test_masks_are_exact_under_ties():
    scores = torch.ones(4, 10)  # a threshold would prune everything or nothing
    assert torch.equal(topk_mask(scores, 0.5).sum(1), torch.full((4,), 5))
    assert int(topk_mask(scores, 0.35, per_row=False).sum()) == 14
    assert torch.equal(nm_mask(torch.ones(3, 8), 2, 4).reshape(3, 2, 4).sum(-1), torch.full((3, 2), 2))
    assert not nm_valid(torch.ones(2, 8), 2, 4) and nm_valid(torch.zeros(2, 8), 2, 4) and not nm_valid(torch.zeros(2, 6), 2, 4)


@pytest.mark.parametrize("bad", ["3:2", "0:4", "4:4", "2:", "a:b", "2:4:8", "-1:4", "1:512"])
def test_bad_patterns_are_refused(bad):
    with pytest.raises(QuantkitError):
        parse_pattern(bad)


def test_wanda_on_a_model_uses_block_inputs(stories, calib_ids):
    model, _ = stories
    res = compress(model, "wanda", {"pattern": "2:4"}, calib_ids=calib_ids)
    assert {r.sparsity for r in res.log} == {0.5} and len(res.log) == 35 and not res.quantized
    for r in res.log:
        assert nm_valid(model.get_submodule(r.module).weight, 2, 4)
    assert res.extra["sparsity"]["overall"] == 0.5


def test_magnitude_needs_no_calibration(stories):
    model, _ = stories
    res = compress(model, "magnitude", {"sparsity": 0.6})
    for r in res.log:
        w = model.get_submodule(r.module).weight
        assert int((w == 0).sum()) == n_pruned(w.numel(), 0.6)
    assert res.extra["sparsity"]["min"] == pytest.approx(0.6, abs=1e-3) == res.extra["sparsity"]["max"]
