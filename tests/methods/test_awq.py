"""AWQ: the search on toy layers, function-preserving folding on real models, and the full
quantize -> save -> load -> eval path on the stories260K fixture."""

import json

import pytest
import torch
from click.testing import CliRunner

from quantkit import api
from quantkit.calibrate.driver import BlockMethod, run_blockwise
from quantkit.eval.perplexity import perplexity
from quantkit.methods.awq import AWQConfig, awq_block, awq_scales, rtn_fake, search_clip, search_scale
from quantkit.core.quant import QuantSpec
from quantkit.testing import outlier_inputs, tiny_opt
from quantkit.testing import output_error as _out_err


def _outlier_inputs(seed=0, tokens=512, in_f=128, n_outliers=4, scale=30.0):
    g = torch.Generator().manual_seed(seed)
    return outlier_inputs(tokens=tokens, in_f=in_f, n_outliers=n_outliers, scale=scale, generator=g), g


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(3, 64, False), QuantSpec(4, -1, True)])
def test_awq_beats_rtn_on_outlier_block(spec):
    """A toy block: two linears sharing an input with outlier channels, then a ReLU and a third linear."""
    x, g = _outlier_inputs()
    w1, w2 = torch.randn(64, 128, generator=g), torch.randn(64, 128, generator=g)
    w3 = torch.randn(32, 64, generator=g) / 8

    def block(a, b):
        return torch.relu(x @ a.T) * (x @ b.T) @ w3.T

    ref = block(w1, w2)

    def loss_fn(w_hats):
        return float((block(*w_hats) - ref).pow(2).mean())

    s, alpha, loss, history = search_scale(x.abs().mean(0), [w1, w2], loss_fn, [spec, spec], n_grid=20)
    loss_rtn = loss_fn([rtn_fake(w1, spec), rtn_fake(w2, spec)])
    assert history[0] == pytest.approx(loss_rtn)  # alpha = 0 is plain RTN
    assert len(history) == 20 and alpha > 0
    assert loss <= 0.8 * loss_rtn
    # the scales protect the outlier channels
    assert s[:4].min() > s[4:].max()


def test_awq_scales_are_normalised():
    x_mean = torch.rand(64) + 0.01
    for alpha in (0.0, 0.3, 1.0):
        s = awq_scales(x_mean, alpha)
        assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(awq_scales(x_mean, 0.0), torch.ones(64))


def test_clip_search_lowers_output_error_of_heavy_tailed_weights():
    x, g = _outlier_inputs(seed=1, scale=1.0)
    w = torch.randn(48, 128, generator=g) * torch.exp(torch.randn(48, 128, generator=g))  # heavy tails
    spec = QuantSpec(3, 32, True)
    max_val = search_clip(w, x, spec)
    group_max = w.abs().reshape(48, 4, 32).amax(-1)
    assert max_val.shape == (48, 4)
    assert torch.all(max_val <= group_max + 1e-6) and torch.all(max_val >= 0.5 * group_max - 1e-6)
    assert (max_val < group_max).float().mean() > 0.25  # many groups are clipped ...
    clipped = torch.maximum(torch.minimum(w.reshape(48, 4, 32), max_val[..., None]), -max_val[..., None]).reshape(48, 128)
    assert _out_err(x, w, rtn_fake(clipped, spec)) < 0.9 * _out_err(x, w, rtn_fake(w, spec))  # ... and it pays off


class _FoldOnly(BlockMethod):
    """Runs AWQ's search and folding without clipping or quantization."""

    name = "awq-fold-only"

    def __init__(self, config):
        super().__init__(config)
        self.scaled = 0

    def process_block(self, ctx):
        scales, clips, skipped = awq_block(ctx, self.config)
        assert not clips
        self.scaled += len(scales)


@pytest.mark.parametrize("which", ["stories", "opt"])
def test_awq_folding_preserves_float_outputs(which, stories, calib_ids):
    if which == "stories":
        model = stories[0]
        ids, calib = calib_ids[:2, :64], calib_ids[:4, :96]
    else:
        model = tiny_opt()
        gen = torch.Generator().manual_seed(0)
        ids, calib = torch.randint(0, 96, (2, 24), generator=gen), torch.randint(0, 96, (4, 32), generator=gen)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    method = _FoldOnly(AWQConfig(bits=3, group_size=-1, clip=False, n_grid=5))
    run_blockwise(model, method, calib, batch_size=2)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert method.scaled == (3 if which == "stories" else 4) * model.config.num_hidden_layers  # stories: v->o is GQA, not foldable
    assert float((after - before).norm() / before.norm()) < 1e-5


def test_awq_quantize_save_load_eval(stories, calib_ids, eval_windows, tmp_path):
    model, tok = stories
    rtn = api.load_model("tests/fixtures/stories260K")[0]
    api.compress(rtn, "rtn", {"bits": 3, "group_size": -1})
    res = api.compress(model, "awq", {"bits": 3, "group_size": -1, "n_grid": 10}, calib_ids=calib_ids)
    assert len(res.quantized) == 35
    assert len(res.extra["awq"]["scales"]) == 15 and res.extra["awq"]["clipped"]
    assert all("grouped-query" in why for why in res.extra["awq"]["not_scaled"].values())
    ppl = perplexity(model, eval_windows)["perplexity"]
    assert ppl < perplexity(rtn, eval_windows)["perplexity"]
    api.save(model, tok, tmp_path / "awq", "awq", res)
    cfg = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert cfg["method"] == "awq" and cfg["bits"] == 3
    loaded, _ = api.load_model(str(tmp_path / "awq"))
    assert perplexity(loaded, eval_windows)["perplexity"] == pytest.approx(ppl, rel=2e-2)


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_cli_quantize_awq(method, stories_dir, tiny_text, tmp_path):
    from quantkit.cli import cli

    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(out), "--method", method, "--bits", "4",
                                 "--group-size", "-1", "--calib", str(tiny_text), "--nsamples", "4", "--seqlen", "64",
                                 "--n-grid", "5", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["method"] == method and info["modules"] == 35


def test_awq_config_checks_itself():
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="n_grid"):
        AWQConfig(n_grid=1)
    with pytest.raises(QuantkitError, match="max_shrink"):
        AWQConfig(max_shrink=1.0)
    with pytest.raises(QuantkitError, match="damp"):
        api.make_config("awq+gptq", {"damp": 2.0})


def test_awq_leaves_ignored_linears_in_float(stories, calib_ids):
    model, _ = stories
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    res = api.compress(model, "awq", {"bits": 4, "group_size": -1, "n_grid": 4, "ignore": (r"mlp\.down_proj$",)},
                       calib_ids=calib_ids[:4])
    assert len(res.quantized) == 30 and not any(n.endswith("down_proj") for n in res.quantized)
    assert not any(n.endswith("down_proj") for n in res.extra["awq"]["clipped"])
    assert len(res.extra["awq"]["scales"]) == 2 * 5  # up_proj -> down_proj is not searched: nothing to protect
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, down)  # neither scaled, clipped nor quantized


def test_awq_never_clips_the_architectures_qk_linears_unless_told(stories, calib_ids):
    """The default exclusion is the arch table's ``qk`` (q and k projections); a regex replaces it."""
    model, _ = stories
    res = api.compress(model, "awq", {"bits": 3, "group_size": -1, "n_grid": 4}, calib_ids=calib_ids[:4])
    clipped = res.extra["awq"]["clipped"]
    assert clipped and not any(n.endswith(("q_proj", "k_proj")) for n in clipped)
    assert any(n.endswith("v_proj") for n in clipped)
    model2 = api.load_model("tests/fixtures/stories260K")[0]
    res = api.compress(model2, "awq", {"bits": 3, "group_size": -1, "n_grid": 4, "clip_exclude": r"v_proj$"},
                       calib_ids=calib_ids[:4])
    clipped = res.extra["awq"]["clipped"]
    assert any(n.endswith("q_proj") for n in clipped) and not any(n.endswith("v_proj") for n in clipped)
