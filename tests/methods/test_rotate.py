"""--rotate and the rotate step: checkpoints that reload with their online transforms, recipes,
refusals, export, and the runtime's paths (lean forward, native decode step) on rotated models."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import DynamicCache

from quantkit import api
from quantkit.cli import cli
from quantkit.core.rotation import online_transforms
from quantkit.errors import QuantkitError
from quantkit.runtime.swap import pack_model
from quantkit.eval.perplexity import perplexity
from quantkit.runtime.lean import LeanLM


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _ppl(path, text):
    res = _cli("eval", "perplexity", path, "--dataset", text, "--seqlen", 128, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.output)["perplexity"]


def test_rotate_step_alone_keeps_the_function_through_the_checkpoint(stories_dir, tiny_text, tmp_path):
    res = _cli("quantize", stories_dir, "-o", tmp_path / "rot", "--method", "rotate", "--json")
    assert res.exit_code == 0, res.output
    qcfg = json.loads((tmp_path / "rot" / "config.json").read_text())["quantization_config"]
    assert qcfg["method"] == "rotate" and len(qcfg["rotation"]["online"]) == 5 and qcfg["modules"] == {}
    assert _ppl(tmp_path / "rot", tiny_text) == pytest.approx(_ppl(stories_dir, tiny_text), rel=1e-5)


def test_rotated_quantized_checkpoint_reloads_with_its_transforms(stories, calib_ids, eval_windows, tmp_path):
    model, tok = stories
    res = api.compress(model, "gptq", {"bits": 4, "group_size": -1, "rotate": True}, calib_ids=calib_ids)
    assert set(res.extra["rotation"]["online"]) == {f"model.layers.{i}.mlp.down_proj" for i in range(5)}
    in_memory = perplexity(model, eval_windows)["perplexity"]
    api.save(model, tok, tmp_path / "ck", "gptq", res)
    loaded, _ = api.load_model(str(tmp_path / "ck"))
    assert all(online_transforms(b.mlp.down_proj) for b in loaded.model.layers)
    assert perplexity(loaded, eval_windows)["perplexity"] == pytest.approx(in_memory, rel=1e-4)
    # without its transforms the same weights compute something else: the hooks matter
    for b in loaded.model.layers:
        b.mlp.down_proj._forward_pre_hooks.clear()
    assert perplexity(loaded, eval_windows)["perplexity"] > 1.5 * in_memory


def test_recipe_rotate_step_equals_the_rotate_option(stories_dir, tmp_path):
    (tmp_path / "a.yaml").write_text("steps:\n  - method: rotate\n  - {method: rtn, bits: 4, group_size: -1}\n")
    (tmp_path / "b.yaml").write_text("steps:\n  - {method: rtn, bits: 4, group_size: -1, rotate: true}\n")
    for name in ("a", "b"):
        res = _cli("run", tmp_path / f"{name}.yaml", stories_dir, "-o", tmp_path / name)
        assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("steps,msg", [
    ("  - {method: rtn, bits: 8}\n  - method: rotate\n", "rotate in the first step"),
    ("  - method: rotate\n  - {method: rtn, bits: 4, group_size: -1, rotate: true}\n", "rotate once"),
])
def test_recipes_rotating_late_or_twice_are_refused(stories_dir, tmp_path, steps, msg):
    (tmp_path / "r.yaml").write_text("steps:\n" + steps)
    res = _cli("run", tmp_path / "r.yaml", stories_dir, "-o", tmp_path / "out")
    assert res.exit_code != 0 and msg in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_stream_with_rotate_is_refused_before_work(tiny_sharded, tmp_path):
    res = _cli("quantize", tiny_sharded, "-o", tmp_path / "o", "--method", "rtn", "--rotate", "--stream")
    assert res.exit_code != 0 and "--no-stream" in res.output and not (tmp_path / "o").exists()


def test_unrotatable_architecture_is_refused_in_one_line(tmp_path):
    from quantkit.testing import tiny_opt

    model = tiny_opt()
    with pytest.raises(QuantkitError, match="cannot rotate a opt model"):
        api.compress(model, "rtn", {"bits": 4, "group_size": -1, "rotate": True})


def test_export_refuses_online_transforms_and_takes_a_plain_rotation(tiny_sharded, tmp_path):
    for name, flag in (("online", "--online-hadamard"), ("plain", "--no-online-hadamard")):
        res = _cli("quantize", tiny_sharded, "--no-stream", "-o", tmp_path / name, "--method", "rtn", "--rotate", flag,
                   "--bits", 4, "--group-size", -1)
        assert res.exit_code == 0, res.output
    res = _cli("export", tmp_path / "online", "--format", "gptq", "-o", tmp_path / "g1")
    assert res.exit_code != 0 and "online Hadamard" in res.output and "--no-online-hadamard" in res.output
    assert not (tmp_path / "g1").exists()
    res = _cli("export", tmp_path / "plain", "--format", "gptq", "-o", tmp_path / "g2")
    assert res.exit_code == 0, res.output
    qcfg = json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]
    assert qcfg["rotation"]["online"] == {}


def test_awq_with_rotate_leaves_the_online_rotated_group_unscaled(stories, calib_ids, eval_windows):
    model, _ = stories
    fp = perplexity(model, eval_windows)["perplexity"]
    res = api.compress(model, "awq", {"bits": 8, "group_size": -1, "rotate": True}, calib_ids=calib_ids)
    notes = " ".join(r.note for r in res.log if r.module.endswith("mlp.down_proj"))
    assert "rotated online" in notes
    assert perplexity(model, eval_windows)["perplexity"] == pytest.approx(fp, rel=0.02)


def test_lean_runtime_runs_rotated_checkpoints(stories, tmp_path):
    model, tok = stories
    res = api.compress(model, "rtn", {"bits": 4, "group_size": -1, "rotate": True})
    api.save(model, tok, tmp_path / "ck", "rtn", res)
    loaded, _ = api.load_model(str(tmp_path / "ck"))
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = loaded(ids, past_key_values=DynamicCache(config=loaded.config), use_cache=True).logits[:, -1].float()
        lm = LeanLM(loaded, max_len=16)
        got = lm.forward(ids)
        step = lm.forward(got.argmax(-1, keepdim=True))
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3)
    assert torch.isfinite(step).all()


def test_cli_w4a8_checkpoint_records_act_bits_and_generates(stories_dir, tiny_text, tmp_path):
    res = _cli("quantize", stories_dir, "-o", tmp_path / "w4a8", "--method", "gptq", "--rotate", "--bits", 4,
               "--group-size", -1, "--act-bits", 8, "--act-clip", 0.9, "--calib", tiny_text, "--nsamples", 8,
               "--seqlen", 64, "--json")
    assert res.exit_code == 0, res.output
    modules = json.loads((tmp_path / "w4a8" / "config.json").read_text())["quantization_config"]["modules"]
    assert {e["act_bits"] for e in modules.values()} == {8} and {e["act_clip"] for e in modules.values()} == {0.9}
    loaded, _ = api.load_model(str(tmp_path / "w4a8"))
    assert all(m.act_bits == 8 and m.act_clip == 0.9 for m in loaded.modules() if hasattr(m, "act_bits"))
    gen = _cli("generate", tmp_path / "w4a8", "Once upon a time", "--max-new-tokens", 8, "--kv-bits", 4)
    assert gen.exit_code == 0 and gen.output.strip(), gen.output
    w4 = _ppl(tmp_path / "w4a8", tiny_text)
    assert 1 < w4 < 1.5 * _ppl(stories_dir, tiny_text)


def test_act_bits_refusals_are_one_line(stories_dir, tmp_path):
    res = _cli("quantize", stories_dir, "-o", tmp_path / "x", "--method", "rtn", "--act-bits", 3)
    assert res.exit_code != 0 and "act_bits must be 8 or 4" in res.output and "Traceback" not in res.output


def test_a_rotated_checkpoint_quantized_later_keeps_its_transforms(stories_dir, tiny_text, tmp_path):
    assert _cli("quantize", stories_dir, "-o", tmp_path / "rot", "--method", "rotate").exit_code == 0
    res = _cli("quantize", tmp_path / "rot", "-o", tmp_path / "q", "--method", "rtn", "--bits", 8, "--group-size", -1)
    assert res.exit_code == 0, res.output
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert len(qcfg["rotation"]["online"]) == 5 and qcfg["format_version"] == 2
    assert _ppl(tmp_path / "q", tiny_text) == pytest.approx(_ppl(stories_dir, tiny_text), rel=0.01)
    res = _cli("quantize", tmp_path / "rot", "-o", tmp_path / "q2", "--method", "rtn", "--rotate", "--group-size", -1)
    assert res.exit_code != 0 and "rotated already" in res.output
    res = _cli("quantize", tmp_path / "q", "-o", tmp_path / "q3", "--method", "rtn", "--group-size", -1)
    assert res.exit_code != 0 and "already compressed (QuantLinear)" in res.output


def test_hostile_rotation_records_are_one_line_errors(stories_dir, tmp_path):
    assert _cli("quantize", stories_dir, "-o", tmp_path / "r", "--method", "rtn", "--rotate", "--group-size", -1).exit_code == 0
    cfg_path = tmp_path / "r" / "config.json"
    good = json.loads(cfg_path.read_text())
    for bad in ("x", [1], {"online": 5}, {"online": {"model.layers.0.mlp.down_proj": "172"}}):
        cfg = json.loads(json.dumps(good))
        cfg["quantization_config"]["rotation"] = bad
        cfg_path.write_text(json.dumps(cfg))
        for args in (("export", tmp_path / "r", "--format", "gptq", "-o", tmp_path / "g"),
                     ("eval", "perplexity", tmp_path / "r", "--dataset", tmp_path / "r" / "config.json")):
            res = _cli(*args)
            assert res.exit_code != 0 and "Traceback" not in res.output and "internal error" not in res.output, res.output


def test_online_transform_runs_in_float32_for_half_inputs():
    from quantkit.core.rotation import OnlineHadamard

    x = torch.full((2, 256), 300.0, dtype=torch.float16)
    y = OnlineHadamard(256)(None, (x,))[0]
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_act_bits_with_an_asymmetric_8bit_override_is_refused():
    from quantkit.methods.gptq import GPTQConfig

    with pytest.raises(QuantkitError, match="asymmetric 8-bit"):
        GPTQConfig(bits=4, act_bits=8, overrides=((r"down_proj", {"bits": 8, "sym": False}),))


def test_act_clip_search_picks_a_clip_per_linear_that_beats_the_fixed_one(stories, calib_ids, eval_windows):
    """--act-clip-search: each linear's clip ratio chosen on the calibration data (stored per module,
    reloaded); on the tiny model it does no worse than the best single ratio it tries."""
    import copy

    from quantkit.eval.perplexity import perplexity
    from quantkit.methods.base import ACT_CLIPS

    model, _ = stories
    opts = {"bits": 4, "group_size": -1, "rotate": True, "act_bits": 4}
    searched = copy.deepcopy(model)
    res = api.compress(searched, "rtn", {**opts, "act_clip_search": True}, calib_ids=calib_ids[:2])
    clips = {q.act_clip for q in res.quantized.values()}
    assert clips <= set(ACT_CLIPS) and len(clips) > 1  # chosen per linear
    assert all(q.config_entry()["act_clip"] == q.act_clip for q in res.quantized.values() if q.act_clip != 1.0)
    pack_model(searched, res.quantized)
    ppl = perplexity(searched, eval_windows[:4])["perplexity"]
    fixed = {}
    for c in (1.0, 0.7):
        m = copy.deepcopy(model)
        r = api.compress(m, "rtn", {**opts, "act_clip": c})
        pack_model(m, r.quantized)
        fixed[c] = perplexity(m, eval_windows[:4])["perplexity"]
    assert ppl <= min(fixed.values()) * 1.01, (ppl, fixed)
