"""--target-bpw: the Fisher statistics, the rounding cost, and the allocation end to end (the
checkpoint's measured bits per weight never over the budget; the CLI and recipes take it)."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from quantkit import api
from quantkit.calibrate.sensitivity import fisher_statistics, plan_bits, rounding_cost
from quantkit.checkpoint.formats import load_model
from quantkit.cli import cli
from quantkit.core.quant import QuantSpec
from quantkit.errors import QuantkitError
from quantkit.methods.gptq import GPTQConfig
from quantkit.models.arch import arch_for
from quantkit.runtime.qlinear import QuantLinear, bits_per_weight


def _names(model):
    arch = arch_for(model)
    return arch, [f"{arch.blocks_path}.{i}.{n}" for i in range(len(arch.blocks(model))) for n in arch.linear_names()]


def test_fisher_statistics_shapes_and_no_weight_gradients(stories, calib_ids):
    model, _ = stories
    arch, names = _names(model)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = fisher_statistics(model, names[:3], arch.embeddings[0], calib_ids[:2])
    for n in names[:3]:
        f, h = stats[n]
        mod = model.get_submodule(n)
        assert f.shape == (mod.out_features,) and h.shape == (mod.in_features,)
        assert (f > 0).all() and (h > 0).all()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


def test_rounding_cost_is_the_weighted_squared_error_and_falls_with_bits():
    torch.manual_seed(0)
    w, f, h = torch.randn(8, 64), torch.rand(8) + 0.1, torch.rand(64) + 0.1
    spec = QuantSpec(3, 32)
    from quantkit.core.quant import dequantize, quantize_rtn

    q, s, z = quantize_rtn(w, spec)
    d = dequantize(q, s, z, 32) - w
    assert rounding_cost(w, spec, f, h) == pytest.approx(0.5 * float((f[:, None] * d ** 2 * h[None, :]).sum()), rel=1e-6)
    costs = [rounding_cost(w, QuantSpec(b, 32), f, h) for b in (2, 3, 4, 6, 8)]
    assert costs == sorted(costs, reverse=True)
    assert rounding_cost(w, spec, f * 10, h) == pytest.approx(10 * rounding_cost(w, spec, f, h), rel=1e-6)


def test_plan_bits_gives_sensitive_linears_more_bits(stories, calib_ids, monkeypatch):
    """A linear whose output the loss is 1e6 times as sensitive to gets the most bits."""
    model, _ = stories
    arch, names = _names(model)
    import quantkit.calibrate.sensitivity as sens

    real = sens.fisher_statistics

    def planted(*a, **k):
        stats = real(*a, **k)
        f, h = stats[names[3]]
        stats[names[3]] = (f * 1e6, h)
        return stats

    monkeypatch.setattr(sens, "fisher_statistics", planted)
    cfg = GPTQConfig(target_bpw=3.0, group_size=-1)
    new, report = plan_bits(model, arch, cfg, calib_ids[:2], names)
    bits = {r["module"]: r["bits"] for r in report["modules"]}
    assert bits[names[3]] == max(bits.values()) >= 5
    assert report["bits_per_weight"] <= 3.0
    assert new.spec_for(names[3]).bits == bits[names[3]]


def _packed_bits(model) -> tuple[int, int]:
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return sum(m.weight_bytes() for m in mods), sum(m.in_features * m.out_features for m in mods)


@pytest.mark.parametrize("method,budget", [("gptq", 3.5), ("rtn", 2.75), ("awq", 4.0), ("awq+gptq", 3.0)])
def test_the_checkpoint_never_exceeds_the_budget(stories, calib_ids, tmp_path, method, budget):
    model, tok = stories
    res = api.compress(model, method, {"target_bpw": budget}, calib_ids=calib_ids[:4])
    ids = calib_ids[:1, :32]
    with torch.no_grad():
        in_memory = model(input_ids=ids).logits
    out = api.save(model, tok, tmp_path / "q", method, res)
    report = json.loads((out / "allocation.json").read_text())
    assert report["target_bpw"] == budget and len(report["modules"]) == len(res.quantized)
    loaded, _ = load_model(str(out))
    with torch.no_grad():  # the runtime runs every width it was given (2-8 bits, any group size)
        assert torch.allclose(loaded(input_ids=ids).logits, in_memory, atol=1e-3, rtol=1e-3)
    nbytes, nweights = _packed_bits(loaded)
    assert 8 * nbytes <= budget * nweights
    assert 8 * nbytes / nweights == pytest.approx(report["bits_per_weight"]) == pytest.approx(bits_per_weight(loaded))
    assert len({(m.bits, m.group_size) for m in loaded.modules() if isinstance(m, QuantLinear)}) > 1  # mixed
    entries = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    for row in report["modules"]:
        assert entries[row["module"]]["bits"] == row["bits"] and entries[row["module"]]["group_size"] == row["group_size"]


def test_user_overrides_stay_fixed_and_count(stories, calib_ids):
    model, _ = stories
    res = api.compress(model, "rtn", {"target_bpw": 4.0, "overrides": ((r"down_proj$", {"bits": 8, "group_size": -1}),)},
                       calib_ids=calib_ids[:2])
    assert all(q.spec.bits == 8 and q.spec.group_size == -1 for n, q in res.quantized.items() if n.endswith("down_proj"))
    assert max(q.spec.bits for n, q in res.quantized.items() if not n.endswith("down_proj")) < 8


def test_bad_budgets_are_refused(stories, calib_ids):
    for bad in (0.5, 17, True, "3"):
        with pytest.raises(QuantkitError, match="target_bpw"):
            GPTQConfig(target_bpw=bad)
    model, _ = stories
    with pytest.raises(QuantkitError, match="below the smallest formats"):
        api.compress(model, "rtn", {"target_bpw": 1.5}, calib_ids=calib_ids[:2])
    with pytest.raises(QuantkitError, match="calibration"):
        api.compress(model, "rtn", {"target_bpw": 3.0})


def test_cli_target_bpw_json_and_errors(stories_dir, tiny_text, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(out), "--method", "gptq", "--target-bpw", "3.25",
                                 "--calib", str(tiny_text), "--nsamples", "4", "--seqlen", "64", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["target_bpw"] == 3.25 and info["bits"] is None and 3.0 < info["bits_per_weight"] <= 3.25
    assert (out / "allocation.json").is_file()
    bad = tmp_path / "bad"
    r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(bad), "--method", "rtn", "--target-bpw", "1.2",
                                 "--calib", str(tiny_text), "--nsamples", "2", "--seqlen", "64"])
    assert r.exit_code != 0 and "below the smallest formats" in r.output and "Traceback" not in r.output
    assert not bad.exists()
    r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(bad), "--method", "gptq", "--target-bpw", "3",
                                 "--calib", str(tiny_text), "--seqlen", "64", "--stream"])
    assert r.exit_code != 0 and "--no-stream" in r.output and not bad.exists()


def test_a_recipe_rtn_step_with_a_budget_calibrates(stories, tiny_text):
    """RTN needs no data, but its budget does: the recipe loads the calibration text for it."""
    from quantkit.recipe import parse_recipe, run_recipe

    model, tok = stories
    rec = parse_recipe({"calibration": {"dataset": str(tiny_text), "nsamples": 2, "seqlen": 64},
                        "steps": [{"method": "rtn", "target_bpw": 3.0, "sym": False}]})
    res = run_recipe(rec, model, tok)
    assert res.extra["steps"][0]["allocation"]["bits_per_weight"] <= 3.0
    assert all(not q.spec.sym for q in res.quantized.values())
