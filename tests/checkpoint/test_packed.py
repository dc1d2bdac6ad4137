"""quantize -> save -> load: the packed checkpoint computes what the in-memory model computed."""

import json

import pytest
import torch

from quantkit import api
from quantkit.core.types import PackedEntry
from quantkit.eval.perplexity import perplexity
from quantkit.checkpoint.formats import load_model
from quantkit.runtime.qlinear import QuantLinear


@pytest.mark.parametrize("method,opts", [
    ("rtn", dict(bits=4, group_size=-1, sym=False)),
    ("gptq", dict(bits=3, group_size=-1, sym=True, act_order=True)),
    ("rtn", dict(bits=5, group_size=32, overrides=((r"mlp\.down_proj", {"group_size": -1}),))),
])
def test_packed_checkpoint_matches_in_memory_model(method, opts, stories, calib_ids, eval_windows, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_BACKEND", "reference")
    model, tok = stories
    res = api.compress(model, method, opts, calib_ids=calib_ids)
    ppl_mem = perplexity(model, eval_windows)["perplexity"]
    logits_mem = model(eval_windows[:1]).logits
    api.save(model, tok, tmp_path / "ckpt", method, res)
    loaded, _ = load_model(str(tmp_path / "ckpt"))
    qlinears = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(qlinears) == 35
    ppl_packed = perplexity(loaded, eval_windows)["perplexity"]
    assert abs(ppl_packed - ppl_mem) / ppl_mem < 1e-3
    torch.testing.assert_close(loaded(eval_windows[:1]).logits, logits_mem, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head", [False, True])
def test_identical_inputs_give_byte_identical_checkpoints(stories_dir, tiny_text, tmp_path, head):
    """Two runs, the second packing each block as soon as it is done (what the CLI does, to free
    float weights early): the same bytes."""
    digests = []
    for pack in (False, True):
        model, tok = load_model(str(stories_dir))
        res = api.compress(model, "gptq", dict(bits=4, group_size=-1, quantize_lm_head=head), tokenizer=tok,
                           calib=str(tiny_text), nsamples=4, seqlen=64, pack=pack)
        if pack:  # every block's linears were swapped during the run; only the head (if any) waits for save
            assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
            assert isinstance(model.model.layers[-1].self_attn.q_proj, QuantLinear)
            assert sum(not isinstance(q, PackedEntry) for q in res.quantized.values()) == int(head)
        api.save(model, tok, tmp_path / f"p{pack}", "gptq", res)
        digests.append((tmp_path / f"p{pack}" / "model.safetensors").read_bytes())
    assert digests[0] == digests[1]


def test_mixed_precision_overrides_are_recorded(stories, tmp_path):
    model, tok = stories
    res = api.compress(model, "rtn", dict(bits=4, group_size=-1, overrides=((r"layers\.0\.", {"bits": 8}),)))
    api.save(model, tok, tmp_path / "m", "rtn", res)
    mods = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["modules"]
    assert mods["model.layers.0.self_attn.q_proj"]["bits"] == 8
    assert mods["model.layers.1.self_attn.q_proj"]["bits"] == 4
    loaded, _ = load_model(str(tmp_path / "m"))
    assert loaded.model.layers[0].self_attn.q_proj.bits == 8


def test_gptq_beats_rtn_on_real_model(stories_dir, tiny_text):
    ppl = {}
    from quantkit.data import calibration_samples, eval_windows, load_text, tokenize

    for method in ("rtn", "gptq"):
        model, tok = load_model(str(stories_dir))
        ids = calibration_samples(tok, str(tiny_text), 16, 256, seed=0)
        api.compress(model, method, dict(bits=3, group_size=-1), calib_ids=ids)
        w = eval_windows(tokenize(tok, load_text(str(tiny_text))), 256, max_windows=20)
        ppl[method] = perplexity(model, w)["perplexity"]
    assert ppl["gptq"] < ppl["rtn"]


def test_uncompressed_tensors_keep_the_source_float_type(stories_dir, tiny_text, tmp_path):
    """#21: embeddings, norms and a float head are stored in the source's float type, never wider:
    a bf16 source stays bf16 even when computed in float32 (--dtype float32), and a GGUF source (whose
    weights transformers dequantizes to float32; no float type named) is stored in bf16."""
    from click.testing import CliRunner
    from safetensors import safe_open

    from quantkit.cli import cli

    def dtypes(d):
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return {k: f.get_slice(k).get_dtype() for k in f.keys()}

    model, tok = load_model(str(stories_dir), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16"), tok.save_pretrained(tmp_path / "bf16")
    run = lambda *a: CliRunner().invoke(cli, [*map(str, a), "--method", "rtn", "--bits", "4", "--group-size", "-1"])  # noqa: E731
    r = run("quantize", tmp_path / "bf16", "-o", tmp_path / "q-bf16", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    d = dtypes(tmp_path / "q-bf16")
    assert d["model.embed_tokens.weight"] == "BF16" and d["model.norm.weight"] == "BF16"
    assert d["model.layers.0.mlp.down_proj.scales"] == "F16"
    assert json.loads((tmp_path / "q-bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "q-bf16"), "--format", "gguf", "-o", str(tmp_path / "m.gguf"),
                                 "--float-type", "f32", "--requant", "f32"])
    assert r.exit_code == 0, r.output
    r = run("quantize", tmp_path / "m.gguf", "-o", tmp_path / "q-gguf")
    assert r.exit_code == 0, r.output
    d = dtypes(tmp_path / "q-gguf")
    assert d["model.embed_tokens.weight"] == "BF16" and d["model.norm.weight"] == "BF16"
    r = run("quantize", stories_dir, "-o", tmp_path / "q-fp32")  # a float32 source stays float32
    assert dtypes(tmp_path / "q-fp32")["model.embed_tokens.weight"] == "F32"
