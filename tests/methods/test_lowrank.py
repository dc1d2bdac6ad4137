import json
from pathlib import Path

import pytest
import torch

from quantkit import api
from quantkit.errors import QuantkitError
from quantkit.methods.asvd import act_scaled_svd, whitened_svd, whitening_factor
from quantkit.methods.lowrank import LowRankConfig, energy_rank, saves_parameters
from quantkit.methods.svd import svd_factorize
from quantkit.core.hessian import HessianAccumulator
from quantkit.testing import anisotropic_layer
from quantkit.testing import output_error as _out_err
from quantkit.runtime.lowrank import LowRankLinear

STORIES = Path(__file__).parent.parent / "fixtures" / "stories260K"


def _anisotropic_layer(seed=0, **kw):
    w, x = anisotropic_layer(seed, **kw)
    h = HessianAccumulator(x.shape[1])
    h.add(x)
    return w, x, h


def test_svd_of_exactly_low_rank_matrix_is_exact():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 3, generator=g) @ torch.randn(3, 10, generator=g)
    u, v, s = svd_factorize(W, 3)
    assert u.shape == (3, 10) and v.shape == (12, 3)
    torch.testing.assert_close(v @ u, W, atol=1e-5, rtol=1e-5)
    assert float(s[3:].abs().max()) < 1e-5 * float(s[0])


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_truncated_svd_error_is_the_dropped_spectrum(rank):
    W = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
    u, v, s = svd_factorize(W, rank)
    err = float((W - v @ u).pow(2).sum())
    assert err == pytest.approx(float(s[rank:].pow(2).sum()), rel=1e-4)


@pytest.mark.parametrize("rank", [4, 12, 24])
def test_whitened_svd_beats_plain_svd_on_anisotropic_inputs(rank):
    w, x, h = _anisotropic_layer()
    u, v, _ = svd_factorize(w, rank)
    plain = _out_err(x, w, v @ u)
    u, v, _, _ = whitened_svd(w, h.H, rank)
    white = _out_err(x, w, v @ u)
    u, v, _ = act_scaled_svd(w, x.abs().mean(0), rank)
    act = _out_err(x, w, v @ u)
    assert white < 0.5 * plain
    assert act < plain
    assert white <= act


def test_whitened_truncation_loss_is_the_dropped_whitened_spectrum():
    """SVD-LLM's truncation-aware whitening: each dropped singular value of W S costs exactly its square in output error."""
    w, x, _ = _anisotropic_layer(seed=2, tokens=4096)
    H = x.T.double() @ x.double()
    u, v, s, _ = whitened_svd(w, H, 10, percdamp=0.0)
    err = float(((x.double() @ (w.double() - v.double() @ u.double()).T) ** 2).sum())
    assert err == pytest.approx(float(s[10:].double().pow(2).sum()), rel=1e-3)


def test_ill_conditioned_hessian_is_damped():
    w, x, _ = _anisotropic_layer(seed=3, tokens=16)  # 16 tokens for 96 inputs: rank-deficient
    x[:, 5] = 0  # a dead channel
    h = HessianAccumulator(96)
    h.add(x)
    u, v, s, damp = whitened_svd(w, h.H, 8, percdamp=0.0)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    assert whitening_factor(torch.zeros(4, 4))[0] is None  # nothing seen: the caller falls back to plain SVD
    assert whitened_svd(w, -torch.eye(96), 8) is None


def test_rank_selection_and_config_checks():
    assert LowRankConfig().ratio == 0.8
    assert LowRankConfig(ratio=0.8).rank_for(576, 576) == 230
    r = LowRankConfig(ratio=0.5).rank_for(1536, 576)
    assert r * (1536 + 576) <= 0.5 * 1536 * 576 < (r + 1) * (1536 + 576)
    assert LowRankConfig(rank=40).rank_for(64, 32) is None  # 40 * 96 > 64 * 32: left dense
    assert LowRankConfig(rank=10).rank_for(64, 32) == 10
    assert saves_parameters(64, 32, 21) and not saves_parameters(64, 32, 22)
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert energy_rank(s, 0.6) == 1 and energy_rank(s, 0.9) == 2 and energy_rank(s, 0.99) == 3
    for bad in ({"ratio": 0.8, "rank": 4}, {"ratio": 1.2}, {"rank": 0}, {"energy": 1.0}):
        with pytest.raises(QuantkitError):
            LowRankConfig(**bad)
    with pytest.raises(QuantkitError):
        api.make_config("asvd", {"scaling": "magic"})


def _ppl(model, windows):
    from quantkit.eval.perplexity import perplexity

    return perplexity(model, windows)["perplexity"]


def test_asvd_beats_svd_on_stories(calib_ids, eval_windows):
    from quantkit.checkpoint.formats import load_model

    ppl = {}
    for method in ("svd", "asvd"):
        model, _ = load_model(str(STORIES))
        res = api.compress(model, method, {"ratio": 0.6}, calib_ids=calib_ids)
        s = res.extra["lowrank"]
        assert s["modules"] == 35 and s["left_dense"] == 0
        assert s["params_after"] <= 0.6 * s["params_before"]
        assert s["params_after"] == sum(r * (m.in_features + m.out_features) for name, r in s["ranks"].items()
                                        for m in [model.get_submodule(name)])
        assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in s["ranks"])
        assert s["model_params_after"] == sum(p.numel() for p in model.parameters())
        ppl[method] = _ppl(model, eval_windows)
    assert ppl["asvd"] < ppl["svd"]


def test_energy_mode_leaves_layers_dense_when_no_saving(calib_ids):
    from quantkit.checkpoint.formats import load_model

    model, _ = load_model(str(STORIES))
    res = api.compress(model, "asvd", {"energy": 0.999}, calib_ids=calib_ids)
    s = res.extra["lowrank"]
    assert s["left_dense"] > 0 and s["modules"] + s["left_dense"] == 35
    assert all("left dense" in r.note for r in res.log if r.module not in s["ranks"])


def test_cli_lowrank_json_and_checkpoint(tmp_path, stories_dir, tiny_text):
    from click.testing import CliRunner

    from quantkit.cli import cli

    out = tmp_path / "lr"
    r = CliRunner().invoke(cli, ["lowrank", str(stories_dir), "-o", str(out), "--ratio", "0.5", "--calib", str(tiny_text),
                                 "--nsamples", "4", "--seqlen", "64", "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout.strip().splitlines()[-1])
    assert payload["method"] == "asvd" and payload["modules"] == 35 and payload["param_ratio"] <= 0.5
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["method"] == "asvd"
    assert set(e["kind"] for e in cfg["modules"].values()) == {"lowrank"}
    assert cfg["modules"]["model.layers.0.mlp.down_proj"]["rank"] == 23  # floor(0.5 * 172*64 / (172+64))
    assert (payload["rank_min"], payload["rank_max"]) == (10, 23)  # k_proj 64->32: floor(0.5 * 2048 / 96)
    r = CliRunner().invoke(cli, ["lowrank", str(stories_dir), "-o", str(tmp_path / "x"), "--ratio", "0.5", "--rank", "4"])
    assert r.exit_code != 0 and "not" in r.output and not (tmp_path / "x").exists()
    r = CliRunner().invoke(cli, ["lowrank", str(stories_dir), "-o", str(tmp_path / "y"), "--method", "gptq"])
    assert r.exit_code != 0 and "low-rank" in r.output
    r = CliRunner().invoke(cli, ["lowrank", str(stories_dir), "-o", str(tmp_path / "z"), "--method", "svd", "--scaling", "act"])
    assert r.exit_code != 0 and "asvd" in r.output


def test_cli_lowrank_svd_as_a_subprocess(tmp_path, stories_dir):
    import subprocess
    import sys

    out = tmp_path / "svd"
    p = subprocess.run([sys.executable, "-m", "quantkit.cli", "lowrank", str(stories_dir), "-o", str(out), "--method", "svd",
                        "--rank", "8", "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    payload = json.loads(p.stdout.strip().splitlines()[-1])
    assert payload["modules"] == 35 and payload["rank_min"] == payload["rank_max"] == 8
    assert "parameters kept" in p.stderr
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert all(e == {"kind": "lowrank", "rank": 8} for e in cfg["modules"].values())
