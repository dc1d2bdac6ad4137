"""GGUF export: quantized linears whose blocks gguf's own dequantizer reads back as quantkit's
weights (the block encoders on their own: tests/pack/test_ggml.py), the Q/K row permutation,
metadata and tokenizer, refusals, and a model transformers' GGUF reader loads with quantkit's logits."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFReader, quants

from quantkit import api
from quantkit.cli import cli
from quantkit.checkpoint.gguf import DoesNotFit, quant_linear_blocks, rope_permutation
from quantkit.checkpoint.gguf_tokenizer import bpe_pre_name
from quantkit.runtime.backends import use_backend
from quantkit.runtime.qlinear import QuantLinear


def random_qlinear(bits, group_size, sym, out_f=48, in_f=128, g_idx=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_groups = in_f // (in_f if group_size == -1 else group_size)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g).to(torch.uint8)
    scales = (torch.rand(out_f, n_groups, generator=g) * 0.05 + 1e-3).half().float()
    zeros = torch.randint(0, 2**bits, (out_f, n_groups), generator=g).float()
    return QuantLinear.from_codes(codes, scales, zeros, bits, group_size, sym=sym, g_idx=g_idx)


def gguf_dequantize(rows: torch.Tensor, name: str) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(rows.numpy(), GGMLQuantizationType[name]).copy())


@pytest.mark.parametrize("bits,group_size,expected", [(4, 32, "Q4_0"), (4, 64, "Q4_0"), (4, -1, "Q4_0"),
                                                      (5, 32, "Q5_0"), (8, 64, "Q8_0"), (8, -1, "Q8_0")])
def test_symmetric_blocks_dequantize_bit_exactly(bits, group_size, expected):
    # quantkit's symmetric zero 2**(bits-1) is ggml's offset (8, 16, or int8 storage); a g64 or
    # per-channel scale repeats over its 32-weight blocks: torch.equal, no tolerance
    mod = random_qlinear(bits, group_size, sym=True)
    rows, btype = quant_linear_blocks(mod)
    assert btype.name == expected and rows.dtype == torch.uint8
    assert torch.equal(gguf_dequantize(rows, expected), mod.dequantized_weight())


@pytest.mark.parametrize("bits,expected", [(4, "Q4_1"), (5, "Q5_1")])
def test_asymmetric_blocks_within_fp16_rounding_of_the_offset(bits, expected):
    # ggml stores x = d*q + m with m in fp16: m = fp16(-z*d) is the only rounding
    mod = random_qlinear(bits, 64, sym=False)
    rows, btype = quant_linear_blocks(mod)
    assert btype.name == expected
    ours, theirs = mod.dequantized_weight(), gguf_dequantize(rows, expected)
    offset = (mod.zero_points() * mod.scales.float()).repeat_interleave(64, dim=1)  # z*s per weight
    half_ulp = offset.abs() * 2.0**-11 + 2.0**-25  # fp16: 11 significant bits (+ subnormal floor)
    assert ((theirs - ours).abs() <= half_ulp).all()
    assert not torch.equal(theirs, ours)  # the offset really is rounded: the bound above is what is tested
    # codes and scales themselves are exact: d*q reproduces quantkit's (q - z)*s + z*s
    m = torch.from_numpy(rows.numpy().reshape(48, -1, rows.shape[1] // 4)[..., 2:4].copy().view(np.float16)).float()
    assert torch.equal(theirs - m.squeeze(-1).repeat_interleave(32, dim=1),
                       mod.codes().float() * mod.scales.float().repeat_interleave(64, dim=1))


def test_asymmetric_grid_with_symmetric_zeros_is_q4_0():
    # GPTQ/AWQ-format imports keep explicit zeros: all zeros 8 means a symmetric grid
    mod = random_qlinear(4, 32, sym=True)
    imported = QuantLinear.from_codes(mod.codes(), mod.scales.float(), mod.zero_points(), 4, 32, sym=False)
    rows, btype = quant_linear_blocks(imported)
    assert btype.name == "Q4_0" and torch.equal(gguf_dequantize(rows, "Q4_0"), mod.dequantized_weight())


def test_static_act_order_fits_but_a_scattered_g_idx_does_not():
    contiguous = torch.arange(128, dtype=torch.int32) // 32
    rows, _ = quant_linear_blocks(random_qlinear(4, 32, True, g_idx=contiguous))
    assert rows.shape == (48, 4 * 18)
    scattered = contiguous[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(DoesNotFit, match="act-order without static groups"):
        quant_linear_blocks(random_qlinear(4, 32, True, g_idx=scattered))


@pytest.mark.parametrize("bits,group_size,sym,match", [(3, 32, True, "3-bit symmetric"), (8, 32, False, "8-bit asymmetric"),
                                                       (4, 16, True, "group size 16"), (2, 64, False, "2-bit")])
def test_grids_without_an_exact_ggml_type_are_refused(bits, group_size, sym, match):
    with pytest.raises(DoesNotFit, match=match):
        quant_linear_blocks(random_qlinear(bits, group_size, sym))


def test_input_width_not_a_multiple_of_32_is_refused():
    with pytest.raises(DoesNotFit, match="not a multiple of ggml's 32"):
        quant_linear_blocks(random_qlinear(4, 8, True, in_f=72))


def test_rope_permutation_interleaves_each_heads_halves():
    # llama.cpp row 2i+t of a head is HF row i + t*head_dim/2 of that head
    n_head, head_dim = 3, 8
    perm = rope_permutation(n_head * head_dim, n_head)
    expected = [h * head_dim + t * head_dim // 2 + i for h in range(n_head) for i in range(head_dim // 2) for t in range(2)]
    assert perm.tolist() == expected
    w = torch.randn(n_head * head_dim, 5)
    assert torch.equal(w[perm][torch.argsort(perm)], w)


@pytest.fixture
def gguf_friendly(stories_dir):
    """A tiny random Llama whose widths are multiples of 32 (GQA: 4 heads, 2 KV heads), with
    stories260K's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0)
    return LlamaForCausalLM(cfg).eval(), AutoTokenizer.from_pretrained(str(stories_dir))


def _fields(path):
    r = GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items()}


@pytest.mark.parametrize("sym", [True, False])
def test_export_gguf_end_to_end(gguf_friendly, calib_ids, tmp_path, sym):
    from transformers import AutoModelForCausalLM

    model, tok = gguf_friendly
    res = api.compress(model, "gptq", dict(bits=4, group_size=32, sym=sym), calib_ids=calib_ids)
    api.save(model, tok, tmp_path / "qk", "gptq", res)
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gguf", "-o", str(out), "--float-type", "f32",
                                 "--json"])
    assert r.exit_code == 0, r.output
    qtype = "Q4_0" if sym else "Q4_1"
    assert json.loads(r.stdout)["tensors"] == {"F32": 6, qtype: 14}
    reader, f = _fields(out)
    assert f["general.architecture"] == "llama" and f["general.file_type"] == (2 if sym else 3)
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 64, 128)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.rope.dimension_count"]) == (4, 2, 16)
    assert f["llama.context_length"] == 256 and f["llama.vocab_size"] == 512 and f["llama.rope.freq_base"] == 10000.0
    assert f["tokenizer.ggml.model"] == "llama" and len(f["tokenizer.ggml.tokens"]) == 512
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    assert tensors["blk.0.attn_k.weight"].tensor_type.name == qtype and tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"

    # the Q/K rows were permuted whole: undoing the permutation gives quantkit's weights
    packed, _ = api.load_model(str(tmp_path / "qk"))
    for proj, heads in (("q", 4), ("k", 2)):
        t = tensors[f"blk.1.attn_{proj}.weight"]
        w = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).copy())
        perm = rope_permutation(w.shape[0], heads)
        mod = packed.model.layers[1].self_attn.get_submodule(f"{proj}_proj")
        if sym:
            assert torch.equal(w[torch.argsort(perm)], mod.dequantized_weight())
        else:  # within fp16 rounding of the offsets z*s
            half_ulp = float((mod.zero_points() * mod.scales.float()).abs().max()) * 2.0**-11
            torch.testing.assert_close(w[torch.argsort(perm)], mod.dequantized_weight(), rtol=0, atol=half_ulp)

    # an independent reader (transformers' GGUF loader undoes the permutation itself) computes quantkit's logits
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    with use_backend("reference"), torch.no_grad():
        ours = api.load_model(str(tmp_path / "qk"))[0](calib_ids[:2]).logits
        # symmetric: the same weights; asymmetric: offsets rounded to fp16 (about 1e-5 per weight)
        torch.testing.assert_close(theirs(calib_ids[:2]).logits, ours, rtol=0, atol=1e-5 if sym else 2e-3)


def test_stories260k_layers_left_in_float_and_spm_tokenizer(stories, calib_ids, tmp_path):
    # stories260K's MLP is 172 wide: g32 cannot quantize down_proj, which stays float (F16 here)
    model, tok = stories
    res = api.compress(model, "gptq", dict(bits=4, group_size=32, ignore=(r"mlp\.down_proj$",)), calib_ids=calib_ids)
    api.save(model, tok, tmp_path / "qk", "gptq", res)
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gguf", "-o", str(tmp_path / "s.gguf")])
    assert r.exit_code == 0, r.output
    reader, f = _fields(tmp_path / "s.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "F16" and types["output_norm.weight"] == "F32"
    assert f["llama.feed_forward_length"] == 172 and f["llama.rope.dimension_count"] == 8
    # SentencePiece-style vocabulary: pieces in id order, byte tokens typed, merges ranked by score
    vocab = tok.get_vocab()
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is True
    assert [vocab[t] for t in f["tokenizer.ggml.tokens"]] == list(range(512))
    types = f["tokenizer.ggml.token_type"]
    assert types[0] == 2 and types[1] == 3 and types[3] == 6 and types[300] == 1  # <unk>, <s> control, <0x00> byte
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    scores = f["tokenizer.ggml.scores"]
    assert scores[vocab["▁t"]] > scores[vocab["▁a"]] > scores[vocab["▁the"]]  # earlier merges score higher
    # transformers rebuilds a tokenizer from the GGUF vocabulary that encodes like the original
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="s.gguf")
    text = "Once upon a time, there was a little girl named Lily. She liked 123 apples!"
    assert again(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids


def test_byte_level_bpe_tokenizer(gguf_friendly, tiny_text, tmp_path):
    # a GPT-2-style vocabulary (SmolLM2's kind): tokenizer.ggml.model gpt2, merges, added tokens typed
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train([str(tiny_text)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    model, _ = gguf_friendly
    res = api.compress(model, "rtn", dict(bits=8, group_size=-1))
    api.save(model, tok, tmp_path / "qk", "rtn", res)
    out = tmp_path / "b.gguf"
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gguf", "-o", str(out)])
    assert r.exit_code == 0, r.output
    reader, f = _fields(out)
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.0.attn_")} == {"Q8_0", "F32"}
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == 512 and tokens[400:402] == ["[PAD400]", "[PAD401]"] and types[400] == 5  # padded to vocab_size
    assert types[:3] == [3, 3, 3] and tokens[1] == "<|im_start|>" and types[100] == 1
    assert len(f["tokenizer.ggml.merges"]) == len(json.loads((tmp_path / "qk" / "tokenizer.json").read_text())["model"]["merges"])
    assert f["tokenizer.ggml.bos_token_id"] == 1
    again = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="b.gguf")
    text = "Tom and Sue went to the park."
    assert again(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    # transformers rebuilds this vocabulary with a bare ByteLevel; quantkit restores the Digits step the
    # file's tokenizer.ggml.pre names, so digits tokenize as the original does (ecosystem audit F10)
    from quantkit.models.load import load_tokenizer, restore_gguf_pre_tokenizer

    assert type(again.backend_tokenizer.pre_tokenizer).__name__ == "ByteLevel"
    ours = load_tokenizer(str(out))
    digits = "In 1999, (  12  ) apples cost 3.50"
    assert ours(digits, add_special_tokens=False).input_ids == tok(digits, add_special_tokens=False).input_ids
    assert json.loads(ours.backend_tokenizer.to_str())["pre_tokenizer"]["pretokenizers"][0]["type"] == "Digits"
    assert not restore_gguf_pre_tokenizer(ours, "smollm")  # already restored: left alone
    assert not restore_gguf_pre_tokenizer(again, "gpt-2") and not restore_gguf_pre_tokenizer(again, None)


def test_bpe_pre_names():
    assert bpe_pre_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    split = {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"}}
    assert bpe_pre_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel"}]}}) == "llama-bpe"
    assert bpe_pre_name({"pre_tokenizer": {"type": "Whitespace"}}) == "default"


def test_cli_refuses_what_gguf_cannot_hold_exactly(stories, calib_ids, tmp_path):
    model, tok = stories
    res = api.compress(model, "rtn", dict(bits=3, group_size=32, ignore=(r"mlp\.down_proj$",)))
    api.save(model, tok, tmp_path / "qk", "rtn", res)
    out = tmp_path / "x.gguf"
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gguf", "-o", str(out)])
    assert r.exit_code == 1 and "3-bit symmetric grids have no exact ggml block type" in r.output
    assert "--requant" in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))
    # the fallback writes those layers as F32 (exactly the dequantized weights) when asked
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gguf", "-o", str(out), "--requant", "f32", "--json"])
    assert r.exit_code == 0, r.output
    assert "Q4_0" not in json.loads(r.stdout)["tensors"]
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gguf", "-o", str(out), "--requant", "f32"])
    assert r.exit_code == 1 and "already exists" in r.output


def test_cli_refuses_bad_sources(tmp_path, stories_dir):
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "nope"), "--format", "gguf", "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 1 and "not a checkpoint directory" in r.output
    r = CliRunner().invoke(cli, ["export", str(stories_dir), "--format", "gptq", "-o", str(tmp_path / "x"), "--requant", "f32"])
    assert r.exit_code == 1 and "apply to --format gguf only" in r.output


def _qwen3_family(family: str, stories_dir):
    """A tiny random Qwen3 or Qwen3-MoE (4 experts, top 2) whose widths are multiples of 32, or a
    Mixtral, with stories260K's tokenizer.  The head size (128) and Qwen3-MoE's expert width (768)
    are transformers' defaults: its GGUF reader takes them from the config class, not from the
    file's ``key_length`` / ``expert_feed_forward_length`` (which the export writes, for llama.cpp)."""
    from transformers import AutoTokenizer

    from quantkit.models.moe import unfuse_experts
    from quantkit.testing import tiny_moe

    if family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(0)
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                             max_position_embeddings=256)).eval()
    else:
        sizes = {"head_dim": 128, "moe_intermediate_size": 768} if family == "qwen3_moe" else {}
        model = tiny_moe(family, experts=4, top_k=2, vocab_size=512, **sizes)
        unfuse_experts(model)
    return model, AutoTokenizer.from_pretrained(str(stories_dir))


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "mixtral"])
def test_qwen3_and_mixtures_of_experts_export(family, stories_dir, calib_ids, tmp_path):
    """Qwen3 and Qwen3-MoE (rows kept: llama.cpp rotates halves there) reload in transformers' GGUF
    reader with quantkit's logits; each block's experts are one stacked tensor per projection whose
    rows are the experts' own encoded rows, the router float, the counts in the metadata."""
    from transformers import AutoModelForCausalLM

    model, tok = _qwen3_family(family, stories_dir)
    res = api.compress(model, "rtn", dict(bits=4, group_size=32, sym=True), calib_ids=calib_ids, progress=False)
    api.save(model, tok, tmp_path / "qk", "rtn", res)
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gguf", "-o", str(out), "--float-type", "f32"])
    assert r.exit_code == 0, r.output
    reader, f = _fields(out)
    arch = {"qwen3": "qwen3", "qwen3_moe": "qwen3moe", "mixtral": "llama"}[family]
    assert f["general.architecture"] == arch
    tensors = {t.name: t for t in reader.tensors}
    packed, _ = api.load_model(str(tmp_path / "qk"))
    if family != "qwen3":
        assert f[f"{arch}.expert_count"] == 4 and f[f"{arch}.expert_used_count"] == 2
        assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"
        for proj, gg in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            t = tensors[f"blk.1.ffn_{proj}_exps.weight"]
            assert t.tensor_type.name == "Q4_0" and len(t.data.shape) == 3 and t.data.shape[0] == 4
            for e in range(4):
                w = torch.from_numpy(quants.dequantize(t.data[e], t.tensor_type).copy())
                assert torch.equal(w, getattr(packed.model.layers[1].mlp.experts[e], gg).dequantized_weight())
    if family == "mixtral":
        return  # transformers' GGUF reader has no Mixtral (llama.cpp reads it as llama with experts)
    if family == "qwen3_moe":
        assert f["qwen3moe.expert_feed_forward_length"] == 768 and f["qwen3moe.attention.key_length"] == 128
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    with use_backend("reference"), torch.no_grad():
        torch.testing.assert_close(theirs(calib_ids[:2]).logits, packed(calib_ids[:2]).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("extra,why", [({"norm_topk_prob": False}, "norm_topk_prob"),
                                       ({"decoder_sparse_step": 2}, "dense ones")])
def test_a_qwen3_moe_llama_cpp_would_compute_differently_is_refused(stories_dir, calib_ids, tmp_path, extra, why):
    from quantkit.models.moe import unfuse_experts
    from quantkit.testing import tiny_moe

    model = tiny_moe("qwen3_moe", experts=4, top_k=2, vocab_size=512, **extra)
    unfuse_experts(model)
    res = api.compress(model, "rtn", dict(bits=4, group_size=32, sym=True), calib_ids=calib_ids, progress=False)
    api.save(model, None, tmp_path / "qk", "rtn", res)
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gguf", "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code != 0 and why in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m.gguf").exists()
