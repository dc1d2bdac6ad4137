"""--target-bpw with GPTQ: each block linear's promising formats priced by GPTQ's own error on the
linear's full input Hessian (calibrate/pricing.hessian_prices, calibrate/sensitivity.hessian_cost)."""

import pytest
import torch

from quantkit import api
from quantkit.calibrate.pricing import hessian_prices
from quantkit.checkpoint.formats import load_model
from quantkit.calibrate.sensitivity import fisher_statistics, hessian_cost, rounding_cost
from quantkit.core.budget import candidate_specs, lower_hull, stored_bytes
from quantkit.core.hessian import HessianAccumulator
from quantkit.core.quant import QuantSpec, dequantize, quantize_rtn
from quantkit.methods.gptq import GPTQ, GPTQConfig, gptq_quantize
from quantkit.models.arch import arch_for


def test_hessian_cost_is_rounding_cost_on_a_diagonal_hessian():
    torch.manual_seed(0)
    w, f, h = torch.randn(8, 64), torch.rand(8) + 0.1, torch.rand(64) + 0.1
    spec = QuantSpec(3, 32)
    q, s, z = quantize_rtn(w, spec)
    w_hat = dequantize(q, s, z, 32)
    assert hessian_cost(w, w_hat, f, torch.diag(h)) == pytest.approx(rounding_cost(w, spec, f, h), rel=1e-9)


def test_hessian_cost_prices_errors_as_correlated_inputs_add_them():
    """Two inputs that always carry the same value: errors of opposite sign on them cancel in the
    output (cost 0), errors of one sign add up (4x one error's cost); the diagonal sees neither."""
    w, f = torch.zeros(1, 2), torch.ones(1)
    H = torch.ones(2, 2)  # x1 == x2, mean square 1
    assert hessian_cost(w, torch.tensor([[0.1, -0.1]]), f, H) == pytest.approx(0.0, abs=1e-12)
    assert hessian_cost(w, torch.tensor([[0.1, 0.1]]), f, H) == pytest.approx(0.5 * 0.2 ** 2)
    assert hessian_cost(w, torch.tensor([[0.1, 0.0]]), f, H) == pytest.approx(0.5 * 0.1 ** 2)


def _options(model, arch, names, stats):
    out = {}
    for n in names:
        w = model.get_submodule(n).weight.detach().float()
        out[n] = [(s, stored_bytes(s, *w.shape), rounding_cost(w, s, *stats[n])) for s in candidate_specs(w.shape[1], True)]
    return out


def test_block_linears_are_priced_by_gptq_on_their_own_hessian(stories, calib_ids):
    """At the two formats bracketing the budget, the walk's prices equal GPTQ's error on a Hessian
    collected independently from the float model (every block's inputs as the model computes
    them); the other formats' first prices are scaled by the ratio, interpolated between them."""
    model, _ = stories
    arch = arch_for(model)
    names = [f"{arch.blocks_path}.{i}.{n}" for i in range(len(arch.blocks(model))) for n in ("self_attn.q_proj", "mlp.down_proj")]
    ids = calib_ids[:4]
    stats = fisher_statistics(model, names, arch.embeddings[0], ids)
    options = _options(model, arch, names, stats)
    prices = hessian_prices(model, arch, ids, 2, GPTQ(GPTQConfig(target_bpw=3.5)), options, stats)
    assert set(prices) == set(names)

    accs = {n: HessianAccumulator(model.get_submodule(n).in_features) for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, acc=accs[n]: acc.add(a[0])) for n in names]
    with torch.no_grad():
        for i in range(0, 4, 2):
            model(input_ids=ids[i:i + 2], use_cache=False)
    for h in hooks:
        h.remove()
    ratios = []
    for n in names:
        w = model.get_submodule(n).weight.detach().float()
        bpw = {o[0]: 8 * o[1] / w.numel() for o in options[n]}
        hull = lower_hull(options[n])
        refs = [max((o for o in hull if bpw[o[0]] <= 3.5), key=lambda o: o[1]),
                min((o for o in hull if bpw[o[0]] > 3.5), key=lambda o: o[1])]
        scale = {}
        for spec, _, first in refs:
            w_hat = gptq_quantize(w, accs[n].H, spec, act_order=True, static_groups=True)[1]
            scale[spec] = hessian_cost(w, w_hat, stats[n][0], accs[n].H / 2) / first
        priced = {o[0]: o[2] / f[2] for o, f in zip(prices[n], options[n])}
        assert [o[0] for o in prices[n]] == [o[0] for o in options[n]]
        for spec, ratio in priced.items():
            if spec in scale:
                assert ratio == pytest.approx(scale[spec], rel=1e-3)
            else:  # between the references' ratios, or one of them beyond
                lo, hi = sorted(scale.values())
                assert lo * (1 - 1e-6) <= ratio <= hi * (1 + 1e-6)
        ratios += list(scale.values())
    assert sorted(ratios)[len(ratios) // 2] < 0.9  # GPTQ's error feedback: most formats cost less than rounding


def test_a_budget_reports_how_each_linear_was_priced(stories, stories_dir, calib_ids):
    model, _ = stories
    res = api.compress(model, "gptq", {"target_bpw": 3.5, "quantize_lm_head": True}, calib_ids=calib_ids[:4], progress=False)
    report = res.extra["allocation"]
    priced = {r["module"]: r["priced_by"] for r in report["modules"]}
    assert priced.pop("lm_head") == "diagonal" and set(priced.values()) == {"hessian"}
    assert report["bits_per_weight"] <= 3.5
    rtn = api.compress(load_model(str(stories_dir))[0], "rtn", {"target_bpw": 3.5}, calib_ids=calib_ids[:4],
                       progress=False)
    assert {r["priced_by"] for r in rtn.extra["allocation"]["modules"]} == {"diagonal"}


def test_too_few_tokens_for_a_linears_width_keep_the_first_prices(stories, calib_ids):
    """128 tokens against down_proj's 172 inputs: GPTQ would fit them exactly and look free."""
    model, _ = stories
    arch = arch_for(model)
    names = [f"{arch.blocks_path}.0.{n}" for n in ("self_attn.q_proj", "mlp.down_proj")]
    ids = calib_ids[:1]
    stats = fisher_statistics(model, names, arch.embeddings[0], ids)
    prices = hessian_prices(model, arch, ids, 1, GPTQ(GPTQConfig(target_bpw=3.5)), _options(model, arch, names, stats), stats)
    assert list(prices) == [names[0]]  # q_proj: 64 inputs


def test_an_impossible_budget_is_refused_before_the_pricing_pass(stories, calib_ids, monkeypatch):
    import quantkit.calibrate.pricing as pricing

    monkeypatch.setattr(pricing, "catch_block_inputs", lambda *a, **k: pytest.fail("priced an impossible budget"))
    with pytest.raises(Exception, match="below the smallest formats"):
        api.compress(stories[0], "gptq", {"target_bpw": 1.5}, calib_ids=calib_ids[:2], progress=False)
