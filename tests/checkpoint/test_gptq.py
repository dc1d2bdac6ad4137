"""GPTQ-format export: the documented layout, and a reload with identical outputs (the int32 word
layout itself: tests/pack/test_int32.py)."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from quantkit import api
from quantkit.cli import cli
from quantkit.checkpoint.formats import load_model
from quantkit.pack.int32 import unpack_int32


@pytest.fixture
def gptq_friendly(stories_dir, tmp_path):
    """A tiny random Llama whose widths are multiples of 8 (stories260K's MLP is 172 wide), with
    stories260K's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    return model, tok


@pytest.mark.parametrize("sym,act_order,group_size", [(True, False, 32), (False, True, 32), (True, False, -1)])
def test_export_gptq_reloads_with_identical_outputs(gptq_friendly, calib_ids, tmp_path, sym, act_order, group_size):
    model, tok = gptq_friendly
    res = api.compress(model, "gptq", dict(bits=4, group_size=group_size, sym=sym, act_order=act_order, static_groups=False),
                       calib_ids=calib_ids)  # act-order with a g_idx (static groups need none)
    api.save(model, tok, tmp_path / "qk", "gptq", res)
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gptq", "-o", str(tmp_path / "gptq"), "--json"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4 and cfg["checkpoint_format"] == "gptq"
    assert cfg["sym"] == sym and cfg["desc_act"] == act_order
    t = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    groups = 128 // 32 if group_size == 32 else 1
    q = t["model.layers.0.mlp.down_proj.qweight"]
    assert q.dtype == torch.int32 and q.shape == (128 // 8, 64)  # [in/8, out]
    assert t["model.layers.0.mlp.down_proj.scales"].shape == (groups, 64)  # [groups, out]
    assert t["model.layers.0.mlp.down_proj.qzeros"].shape == (groups, 8)  # [groups, out/8]
    assert t["model.layers.0.mlp.down_proj.g_idx"].shape == (128,)
    if sym:  # symmetric 4-bit zero point 8 is stored as 7 (gptq v1)
        assert torch.all(unpack_int32(t["model.layers.0.mlp.down_proj.qzeros"], 4, 1) == 7)
    ours, _ = load_model(str(tmp_path / "qk"))
    theirs, _ = load_model(str(tmp_path / "gptq"))
    x = calib_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x).logits, rtol=0, atol=1e-5)


def test_export_refuses_layers_that_do_not_fit(stories, tmp_path):
    model, tok = stories
    api.save(model, tok, tmp_path / "qk", "rtn", api.compress(model, "rtn", dict(bits=4, group_size=-1)))
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gptq", "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "multiples of 8" in r.output and not (tmp_path / "x").exists()


def test_export_refuses_non_quantkit(stories_dir, tmp_path):
    r = CliRunner().invoke(cli, ["export", str(stories_dir), "--format", "gptq", "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "not a quantkit packed checkpoint" in r.output


def test_export_keeps_the_float_dtype_names_the_architecture_and_flags_a_quantized_head(gptq_friendly, tmp_path):
    """Ecosystem audit F1-F3: a bf16 source exports bf16 floats (not float32), config.json names the
    architecture (vLLM refuses an empty list; transformers' GGUF reader leaves it empty), keeps
    use_cache and no machine path, and a quantized head is flagged ``lm_head: true``."""
    model, tok = gptq_friendly
    model = model.to(torch.bfloat16)
    model.config.architectures = None  # as a GGUF source has it
    api.save(model, tok, tmp_path / "qk", "rtn", api.compress(model, "rtn", dict(bits=4, group_size=32, quantize_lm_head=True)))
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gptq", "-o", str(tmp_path / "gptq")])
    assert r.exit_code == 0, r.output
    assert "lm_head: true" in r.output
    for d in ("qk", "gptq"):
        cfg = json.loads((tmp_path / d / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["use_cache"] is True and "_name_or_path" not in cfg
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["lm_head"] is True
    t = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16 and t["model.norm.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.mlp.down_proj.scales"].dtype == torch.float16
    assert "lm_head.qweight" in t
    src = load_file(str(tmp_path / "qk" / "model.safetensors"))
    assert torch.equal(t["model.embed_tokens.weight"], src["model.embed_tokens.weight"])
