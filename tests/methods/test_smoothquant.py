"""SmoothQuant: the smoothing factors, function-preserving folding on real models, W8A8 weights,
and quantize -> save -> load -> eval with the int8 runtime on the stories260K fixture."""

import json

import pytest
import torch
from click.testing import CliRunner

from quantkit import api
from quantkit.calibrate.driver import BlockMethod, run_blockwise
from quantkit.eval.perplexity import perplexity
from quantkit.methods.smoothquant import SmoothQuantConfig, quantize_int8_weight, smooth_block, smooth_scales
from quantkit.runtime.int8 import Int8Linear
from quantkit.testing import tiny_opt


def test_smooth_scales_formula():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w1 = torch.tensor([[1.0, -2.0, 1.0, 0.5], [0.25, 1.0, 3.0, -1.0]])
    w2 = torch.tensor([[4.0, 0.5, 1.0, 0.5]])
    s = smooth_scales(act, [w1, w2], alpha=0.5)
    w_max = torch.tensor([4.0, 2.0, 3.0, 1.0])
    expected = act.sqrt() / w_max.sqrt()
    expected[2] = 1.0  # a channel never active in calibration is left alone
    assert torch.allclose(s, expected)
    assert torch.equal(smooth_scales(act, [w1], alpha=0.0), torch.ones(4))  # alpha 0: naive W8A8
    # smoothing equalises the per-channel ranges of X / s and W * s at alpha = 0.5
    s = smooth_scales(act[[0, 1, 3]], [w1[:, [0, 1, 3]], w2[:, [0, 1, 3]]], alpha=0.5)
    assert torch.allclose(act[[0, 1, 3]] / s, w_max[[0, 1, 3]] * s)


def test_int8_weight_grid():
    w = torch.randn(16, 40)
    q, scale = quantize_int8_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    err = (q.float() * scale[:, None] - w).abs()
    assert torch.all(err <= scale[:, None] * 0.6)  # half a step, plus the fp16-rounded scale at the range ends
    assert int(q.abs().max()) <= 128


class _SmoothOnly(BlockMethod):
    name = "smooth-only"

    def process_block(self, ctx):
        results, _, _ = smooth_block(ctx, self.config)
        self.n = getattr(self, "n", 0) + len(results)


@pytest.mark.parametrize("which", ["stories", "opt"])
def test_smoothing_preserves_float_outputs(which, stories, calib_ids):
    if which == "stories":
        model = stories[0]
        ids, calib = calib_ids[:2, :64], calib_ids[:4, :96]
    else:
        model = tiny_opt()
        gen = torch.Generator().manual_seed(0)
        ids, calib = torch.randint(0, 96, (2, 24), generator=gen), torch.randint(0, 96, (4, 32), generator=gen)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    method = _SmoothOnly(SmoothQuantConfig(alpha=0.8))
    run_blockwise(model, method, calib, batch_size=2)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert method.n == (3 if which == "stories" else 4) * model.config.num_hidden_layers
    assert float((after - before).norm() / before.norm()) < 1e-5


@pytest.mark.parametrize("act_quant", ["dynamic", "static"])
def test_smoothquant_save_load_eval_runs_int8(act_quant, stories, calib_ids, eval_windows, tmp_path, monkeypatch):
    model, tok = stories
    fp = perplexity(model, eval_windows)["perplexity"]
    res = api.compress(model, "smoothquant", {"alpha": 0.5, "act_quant": act_quant}, calib_ids=calib_ids)
    assert len(res.quantized) == 35 and {qw.kind for qw in res.quantized.values()} == {"w8a8"}
    api.save(model, tok, tmp_path / "sq", "smoothquant", res)
    cfg = json.loads((tmp_path / "sq" / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == 8 and cfg["group_size"] == -1
    assert {e["act"] for e in cfg["modules"].values()} == {act_quant}
    loaded, _ = api.load_model(str(tmp_path / "sq"))
    int8 = [m for m in loaded.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == 35 and all(m.qweight.dtype == torch.int8 for m in int8)
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or real(a, b))
    ppl = perplexity(loaded, eval_windows[:4])["perplexity"]
    assert len(calls) == 35 * 4  # every linear of every window ran the int8 matmul
    assert ppl == pytest.approx(perplexity(api.load_model("tests/fixtures/stories260K")[0], eval_windows[:4])["perplexity"],
                                rel=0.05 if act_quant == "dynamic" else 0.25)
    assert fp > 0


def test_cli_smoothquant_alpha(stories_dir, tiny_text, tmp_path):
    from quantkit.cli import cli

    for alpha in ("0.5", "0"):
        out = tmp_path / f"sq{alpha}"
        r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(out), "--method", "smoothquant", "--alpha", alpha,
                                     "--calib", str(tiny_text), "--nsamples", "4", "--seqlen", "64", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout.strip().splitlines()[-1])["bits"] == 8
    r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(tmp_path / "bad"), "--method", "smoothquant",
                                 "--bits", "4", "--calib", str(tiny_text), "--seqlen", "64"])
    assert r.exit_code != 0 and "W8A8" in r.output


def test_smoothquant_ignore_keeps_float_linears(stories, calib_ids):
    model, _ = stories
    res = api.compress(model, "smoothquant", {"ignore": (r"mlp\.down_proj$",)}, calib_ids=calib_ids[:4])
    assert len(res.quantized) == 30
    assert sum("ignored" in r.note for r in res.log) == 5
