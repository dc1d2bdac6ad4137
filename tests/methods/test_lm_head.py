"""``quantize_lm_head``: the output head quantized too, untied from the float input embedding."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from quantkit import api
from quantkit.core.types import CompressionResult
from quantkit.cli import cli
from quantkit.methods.base import head_statistics, quantize_head
from quantkit.models.load import dir_bytes
from quantkit.checkpoint.formats import load_model
from quantkit.recipe import parse_recipe
from quantkit.api import get_method
from quantkit.runtime.backends import kernel_weight_bytes
from quantkit.runtime.qlinear import QuantLinear

transformers = pytest.importorskip("transformers")

# stories260K: hidden 64, intermediate 172 (so down_proj is per channel), vocab 512, tied
STORIES_OPTS = dict(bits=4, group_size=32, overrides=((r"mlp\.down_proj", {"group_size": -1}),))


def tiny_llama(tied: bool) -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_tied_head_is_untied_quantized_and_reloads(method, stories, calib_ids, eval_windows, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_BACKEND", "reference")
    model, tok = stories
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    res = api.compress(model, method, dict(STORIES_OPTS, quantize_lm_head=True), calib_ids=calib_ids)
    assert "lm_head" in res.quantized and len(res.quantized) == 36
    head_row = [r for r in res.log if r.module == "lm_head"]
    assert len(head_row) == 1 and head_row[0].block == -1 and "untied" in head_row[0].note
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the lookup table is left alone
    with torch.no_grad():
        logits_mem = model(eval_windows[:2]).logits
    api.save(model, tok, tmp_path / "ckpt", method, res)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"]["modules"]["lm_head"]["bits"] == 4
    loaded, _ = load_model(str(tmp_path / "ckpt"))
    assert isinstance(loaded.lm_head, QuantLinear)
    assert type(loaded.model.embed_tokens) is nn.Embedding and torch.equal(loaded.model.embed_tokens.weight, embedding)
    with torch.no_grad():
        torch.testing.assert_close(loaded(eval_windows[:2]).logits, logits_mem, rtol=0, atol=0)


def test_untied_model_checkpoint_shrinks_and_logits_match(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_BACKEND", "reference")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    outs = {}
    for head in (False, True):
        model = tiny_llama(tied=False)
        res = api.compress(model, "rtn", dict(bits=4, group_size=32, quantize_lm_head=head))
        with torch.no_grad():
            logits_mem = model(ids).logits
        api.save(model, None, tmp_path / str(head), "rtn", res)
        loaded, _ = load_model(str(tmp_path / str(head)), with_tokenizer=False)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, logits_mem, rtol=0, atol=0)
        outs[head] = (dir_bytes(tmp_path / str(head)), loaded)
    (plain_bytes, plain), (head_bytes, quant) = outs[False], outs[True]
    assert isinstance(quant.lm_head, QuantLinear) and type(plain.lm_head) is nn.Linear
    head_float = 256 * 64 * 4  # fp32 [vocab, hidden]
    head_packed = kernel_weight_bytes(quant.lm_head)  # codes + fp16 scales, before any conversion
    assert head_packed < head_float / 6
    assert plain_bytes - head_bytes >= head_float - head_packed - 1024  # the whole saving shows on disk


def test_default_leaves_the_head_float_and_tied(stories, tmp_path):
    model, tok = stories
    res = api.compress(model, "rtn", STORIES_OPTS)
    assert "lm_head" not in res.quantized
    assert model.lm_head.weight is model.model.embed_tokens.weight
    api.save(model, tok, tmp_path / "ckpt", "rtn", res)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "lm_head" not in config["quantization_config"]["modules"]
    loaded, _ = load_model(str(tmp_path / "ckpt"))
    assert type(loaded.lm_head) is nn.Linear and loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_gptq_head_beats_rtn_head_on_its_calibration_inputs(stories, calib_ids):
    """GPTQ on lm_head uses the Hessian of the final norm's output: its output error on those
    inputs must not exceed round-to-nearest's."""
    from quantkit.models.arch import arch_for

    model, _ = stories
    arch = arch_for(model)
    X = head_statistics(model, arch, "hessian", calib_ids, 4).H  # 2/n X^T X of the float model's final norm
    w = model.lm_head.weight.detach().clone()
    errors = {}
    for name in ("rtn", "gptq"):
        m, _ = load_model("tests/fixtures/stories260K")
        method = get_method(name)(get_method(name).config_cls(bits=3, group_size=-1, quantize_lm_head=True))
        quantize_head(m, method, calib_ids, 4, CompressionResult())  # the head alone, blocks untouched
        d = m.lm_head.weight.detach() - w  # [vocab, hidden]
        errors[name] = float(torch.einsum("oi,ij,oj->", d, X, d))  # sum over rows of d H d^T
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


def test_a_head_clipped_by_the_float16_scale_range_is_noted():  # A45, for the head
    model = tiny_llama(tied=False)
    with torch.no_grad():
        model.lm_head.weight[7, 3] = 1e6
    res = api.compress(model, "rtn", dict(bits=4, group_size=-1, quantize_lm_head=True))
    head = [r for r in res.log if r.module == "lm_head"]
    assert len(head) == 1 and "weights beyond float16's scale range: 1 group scale(s) clamped at 65504" in head[0].note
    assert not any("float16" in r.note for r in res.log if r.module != "lm_head")


def test_group_size_check_covers_the_head():
    model = tiny_llama(tied=True)  # hidden 64: group 128 would not divide it anywhere; -1 on blocks, 48 on the head
    with pytest.raises(Exception, match="lm_head"):
        api.compress(model, "rtn", dict(bits=4, group_size=-1, quantize_lm_head=True,
                                        overrides=((r"^lm_head$", {"group_size": 48}),)))


def test_cli_flag_and_recipe_key(stories_dir, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(out), "--method", "rtn", "--bits", "4",
                                 "--group-size", "-1", "--quantize-lm-head", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["modules"] == 36
    assert "lm_head" in json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    recipe = parse_recipe({"steps": [{"method": "gptq", "bits": 4, "quantize_lm_head": True}]})
    assert recipe.steps[0].config.quantize_lm_head is True
    r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(tmp_path / "s"), "--method", "smoothquant",
                                 "--quantize-lm-head"])
    assert r.exit_code != 0 and "quantize_lm_head" in r.output


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_other_families_reload(family, tmp_path, monkeypatch):
    """GPT-2 (Conv1D blocks store [in, out], its head is a plain Linear) and OPT (tied head)."""
    config = (transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64) if family == "gpt2" else
              transformers.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=64, word_embed_proj_dim=32))
    monkeypatch.setenv("QUANTKIT_BACKEND", "reference")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))
    res = api.compress(model, "rtn", dict(bits=4, group_size=-1, quantize_lm_head=True))
    with torch.no_grad():
        logits_mem = model(ids).logits
    api.save(model, None, tmp_path / "ckpt", "rtn", res)
    loaded, _ = load_model(str(tmp_path / "ckpt"), with_tokenizer=False)
    assert isinstance(loaded.lm_head, QuantLinear) and (loaded.lm_head.out_features, loaded.lm_head.in_features) == (96, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits_mem, rtol=0, atol=0)
