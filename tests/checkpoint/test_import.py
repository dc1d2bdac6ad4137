"""Loading checkpoints other tools write: AWQ (AutoAWQ GEMM) and GPTQ, each built here by an
independent pure-numpy packer written from the published layout, loaded by quantkit's runtime
and compared with the dequantized reference model."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file
from safetensors.torch import load_file

from quantkit import api
from quantkit.cli import cli
from quantkit.errors import QuantkitError
from quantkit.checkpoint.formats import load_model
from quantkit.runtime.backends import use_backend

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
           "mlp.down_proj")


# ---- the published layouts, written independently of quantkit's code -------------------------------
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ GEMM: nibble i of a word holds column 8c + AWQ_ORDER[i]


def awq_pack(codes: np.ndarray) -> np.ndarray:
    """``[rows, cols]`` 4-bit codes -> ``[rows, cols / 8]`` int32, packed along columns in AWQ's order."""
    rows, cols = codes.shape
    words = np.zeros((rows, cols // 8), dtype=np.uint32)
    for c in range(cols // 8):
        for i in range(8):
            words[:, c] |= codes[:, 8 * c + AWQ_ORDER[i]].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def gptq_pack_rows(codes: np.ndarray) -> np.ndarray:
    """``[rows, cols]`` -> ``[rows / 8, cols]`` int32: row 8r + i at bits 4i of word r (qweight)."""
    rows, cols = codes.shape
    words = np.zeros((rows // 8, cols), dtype=np.uint32)
    for i in range(8):
        words |= codes[i::8].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def gptq_pack_cols(codes: np.ndarray) -> np.ndarray:
    """``[rows, cols]`` -> ``[rows, cols / 8]`` int32: column 8c + i at bits 4i of word c (qzeros)."""
    return np.ascontiguousarray(gptq_pack_rows(codes.T).T)


def tiny_llama(bias: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, attention_bias=bias)
    return LlamaForCausalLM(cfg).eval()


def random_grid(out_f, in_f, group, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (out_f, in_f)).astype(np.uint8)
    z = rng.integers(0, 16, (out_f, in_f // group)).astype(np.uint8)
    s = (rng.random((out_f, in_f // group)) * 0.02 + 1e-3).astype(np.float16)
    return q, z, s


def write_checkpoint(model, directory, qcfg, tensors_for):
    """Float tensors of ``model`` plus each block linear's packed tensors; the reference model
    gets the dequantized weights (and fp16-rounded biases) in place."""
    directory.mkdir()
    quantized = {f"model.layers.{i}.{name}" for i in range(model.config.num_hidden_layers) for name in LINEARS}
    state = {k: v.numpy() for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in quantized}
    for j, name in enumerate(sorted(quantized)):
        lin = model.get_submodule(name)
        packed, w = tensors_for(lin.out_features, lin.in_features, j)
        state.update({f"{name}.{k}": v for k, v in packed.items()})
        lin.weight.data = torch.from_numpy(w)
        if lin.bias is not None:
            lin.bias.data = lin.bias.data.half().float()
            state[f"{name}.bias"] = lin.bias.data.half().numpy()
    save_file(state, str(directory / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = qcfg
    (directory / "config.json").write_text(json.dumps(config))


def check_logits(directory, reference):
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with use_backend("reference"), torch.no_grad():
        loaded, _ = load_model(str(directory), with_tokenizer=False)
        torch.testing.assert_close(loaded(x).logits, reference(x).logits, rtol=0, atol=1e-5)


# ---- AWQ ---------------------------------------------------------------------------------
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True,
              "modules_to_not_convert": None}


def awq_tensors(out_f, in_f, j):
    q, z, s = random_grid(out_f, in_f, 32, j)
    w = (q.astype(np.float32) - np.repeat(z, 32, 1)) * np.repeat(s.astype(np.float32), 32, 1)  # [out, in]
    return {"qweight": awq_pack(q.T), "qzeros": awq_pack(z.T), "scales": np.ascontiguousarray(s.T)}, w


@pytest.mark.parametrize("bias", [False, True])
def test_awq_gemm_checkpoint_loads_with_the_reference_logits(tmp_path, bias):
    model = tiny_llama(bias)
    write_checkpoint(model, tmp_path / "awq", AWQ_CONFIG, awq_tensors)
    t = load_file(str(tmp_path / "awq" / "model.safetensors"))
    assert t["model.layers.0.mlp.down_proj.qweight"].shape == (128, 8) and t["model.layers.0.mlp.down_proj.scales"].shape == (4, 64)
    check_logits(tmp_path / "awq", model)


def awq_sym_tensors(out_f, in_f, j, store_zeros=True):
    """GPTQModel's default AWQ (zero_point: false): a symmetric grid, its zero 8 stored in qzeros or implied."""
    q, _, s = random_grid(out_f, in_f, 32, j)
    w = (q.astype(np.float32) - 8) * np.repeat(s.astype(np.float32), 32, 1)
    packed = {"qweight": awq_pack(q.T), "scales": np.ascontiguousarray(s.T)}
    if store_zeros:
        packed["qzeros"] = awq_pack(np.full((in_f // 32, out_f), 8, np.uint8))
    return packed, w


@pytest.mark.parametrize("store_zeros", [True, False])
def test_symmetric_awq_loads_with_the_reference_logits(tmp_path, store_zeros):
    """Ecosystem audit F9: ``zero_point: false`` was refused; it is the symmetric grid (zero 8)."""
    model = tiny_llama(False)
    write_checkpoint(model, tmp_path / "awq", {**AWQ_CONFIG, "zero_point": False},
                     lambda o, i, j: awq_sym_tensors(o, i, j, store_zeros))
    check_logits(tmp_path / "awq", model)
    loaded, _ = load_model(str(tmp_path / "awq"), with_tokenizer=False)
    assert loaded.model.layers[0].mlp.down_proj.sym


def test_awq_with_zero_points_but_no_qzeros_is_refused(tmp_path):
    model = tiny_llama(False)
    write_checkpoint(model, tmp_path / "awq", AWQ_CONFIG, lambda o, i, j: awq_sym_tensors(o, i, j, store_zeros=False))
    with pytest.raises(QuantkitError, match="zero_point: true.*no .*qzeros"):
        load_model(str(tmp_path / "awq"), with_tokenizer=False)


@pytest.mark.parametrize("change,match", [({"version": "gemv"}, "'gemv' layout"), ({"bits": 3}, "4-bit")])
def test_awq_variants_not_supported_are_refused(tmp_path, change, match):
    model = tiny_llama(False)
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True, **change}
    write_checkpoint(model, tmp_path / "awq", qcfg, lambda o, i, j: ({"qweight": awq_pack(np.zeros((i, o), np.uint8)),
                                                                      "qzeros": awq_pack(np.zeros((i // 32, o), np.uint8)),
                                                                      "scales": np.ones((i // 32, o), np.float16)},
                                                                     np.zeros((o, i), np.float32)))
    with pytest.raises(QuantkitError, match=match):
        load_model(str(tmp_path / "awq"), with_tokenizer=False)
    r = CliRunner().invoke(cli, ["eval", "perplexity", str(tmp_path / "awq"), "--dataset", "x.txt"])
    assert r.exit_code == 1 and "Traceback" not in r.output


# ---- GPTQ --------------------------------------------------------------------------------
GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False, "checkpoint_format": "gptq"}


def gptq_tensors(out_f, in_f, j):
    """One linear's GPTQ tensors with act-order (a permuted ``g_idx``)."""
    q, z, s = random_grid(out_f, in_f, 32, j)
    g_idx = np.random.default_rng(100 + j).permutation(np.arange(in_f) // 32).astype(np.int32)  # act-order
    zeros = np.maximum(z.astype(np.int64) - 1, 0)  # gptq v1 stores z - 1 ...
    z_eff = np.where(z == 0, 1, z)  # ... so a zero point of 0 cannot be stored: use 1 in the reference too
    w = (q.astype(np.float32) - z_eff[:, g_idx]) * s.astype(np.float32)[:, g_idx]
    return {"qweight": gptq_pack_rows(q.T), "qzeros": gptq_pack_cols(zeros.T), "scales": np.ascontiguousarray(s.T),
            "g_idx": g_idx}, w


def test_gptq_checkpoint_with_act_order_loads_with_the_reference_logits(tmp_path):
    model = tiny_llama(False)
    write_checkpoint(model, tmp_path / "gptq", GPTQ_CONFIG, gptq_tensors)
    check_logits(tmp_path / "gptq", model)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_imported_checkpoint_saved_with_save_pretrained_loads_again(tmp_path, fmt):
    """Audit F5 for imported checkpoints: ``save_pretrained`` on an imported GPTQ/AWQ model writes a
    quantkit checkpoint (its config says so) that quantkit and transformers load with the same logits."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama(fmt == "awq")
    write_checkpoint(model, tmp_path / fmt, GPTQ_CONFIG if fmt == "gptq" else AWQ_CONFIG,
                     gptq_tensors if fmt == "gptq" else awq_tensors)
    loaded, _ = load_model(str(tmp_path / fmt), with_tokenizer=False)
    loaded.save_pretrained(tmp_path / "saved")
    qcfg = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "quantkit" and qcfg["method"] == f"imported-{fmt}" and len(qcfg["modules"]) == 14
    check_logits(tmp_path / "saved", model)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    x = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(2))
    with use_backend("reference"), torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_gptq_export_matches_the_independent_packer(stories_dir, calib_ids, tmp_path):
    from transformers import AutoTokenizer

    model = tiny_llama(False)
    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    res = api.compress(model, "gptq", dict(bits=4, group_size=32, sym=False), calib_ids=calib_ids)
    api.save(model, tok, tmp_path / "qk", "gptq", res)
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gptq", "-o", str(tmp_path / "gptq")])
    assert r.exit_code == 0, r.output
    ours = load_model(str(tmp_path / "qk"), with_tokenizer=False)[0]
    t = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        mod = ours.get_submodule(name)
        codes, zeros = mod.codes().numpy(), mod.zero_points().numpy().astype(np.int64)
        assert np.array_equal(t[f"{name}.qweight"].numpy(), gptq_pack_rows(codes.T))
        assert np.array_equal(t[f"{name}.qzeros"].numpy(), gptq_pack_cols(np.maximum(zeros - 1, 0).T))
        assert torch.equal(t[f"{name}.scales"], mod.scales.t())
        assert np.array_equal(t[f"{name}.g_idx"].numpy(), np.arange(mod.in_features) // 32)


# ---- values: what sizes cannot show, checked once the tensors are read ---------------------------
Q = "model.layers.0.self_attn.q_proj"


def poke(directory, name: str, index: int, value) -> None:
    """Set one entry of tensor ``name`` in ``directory``'s model.safetensors to ``value``."""
    from safetensors.torch import save_file as save_torch

    path = str(directory / "model.safetensors")
    t = load_file(path)
    t[name].view(-1)[index] = value
    save_torch(t, path, metadata={"format": "pt"})


@pytest.mark.parametrize("fmt,name,index,value,message", [
    ("gptq", f"{Q}.scales", 5, float("nan"), f"{Q}.scales holds 1 NaN/Inf value(s)"),  # F22
    ("gptq", f"{Q}.g_idx", 5, 1000, f"{Q}.g_idx holds group 1000; the layer has 2 group(s), 0..1"),  # F23
    ("gptq", f"{Q}.g_idx", 5, -1, f"{Q}.g_idx holds group -1; the layer has 2 group(s), 0..1"),  # F24
    ("awq", f"{Q}.scales", 5, float("nan"), f"{Q}.scales holds 1 NaN/Inf value(s)"),  # F31
    ("awq", f"{Q}.scales", 0, float("inf"), f"{Q}.scales holds 1 NaN/Inf value(s)"),
    ("awq", "model.norm.weight", 3, float("nan"), "model.norm.weight holds 1 NaN/Inf value(s)"),
])
def test_broken_values_are_refused_at_load(tmp_path, fmt, name, index, value, message):
    import re

    d = tmp_path / fmt
    write_checkpoint(tiny_llama(False), d, GPTQ_CONFIG if fmt == "gptq" else AWQ_CONFIG,
                     gptq_tensors if fmt == "gptq" else awq_tensors)
    poke(d, name, index, value)
    with pytest.raises(QuantkitError, match=f"^cannot load {re.escape(str(d))}: {re.escape(message)}$"):
        load_model(str(d), with_tokenizer=False)
    r = CliRunner().invoke(cli, ["eval", "perplexity", str(d), "--dataset", "x.txt", "--json"])
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.strip() == f"Error: cannot load {d}: {message}"


def test_gptq_v1_all_ones_zero_field_still_loads(tmp_path):
    """GPTQ v1 stores ``z - 1``: a field of all ones is zero point ``2**bits`` (16 here), as other
    engines read it; quantkit's uint8 zero points hold it, so it loads."""
    d = tmp_path / "gptq"
    write_checkpoint(tiny_llama(False), d, GPTQ_CONFIG, gptq_tensors)
    poke(d, f"{Q}.qzeros", 0, -1)  # eight 4-bit fields of 15
    loaded, _ = load_model(str(d), with_tokenizer=False)
    assert loaded.get_submodule(Q).qzeros[:8, 0].tolist() == [16] * 8


def test_gptq_8bit_zero_point_256_is_refused(stories_dir, tmp_path):
    """An 8-bit GPTQ v1 field of 255 is zero point 256, which quantkit's uint8 zero points cannot
    hold (it would wrap to 0)."""
    from transformers import AutoTokenizer

    model = tiny_llama(False)
    api.save(model, AutoTokenizer.from_pretrained(str(stories_dir)), tmp_path / "qk", "rtn",
             api.compress(model, "rtn", dict(bits=8, group_size=32, sym=False)))
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "gptq", "-o", str(tmp_path / "g8")])
    assert r.exit_code == 0, r.output
    load_model(str(tmp_path / "g8"), with_tokenizer=False)
    poke(tmp_path / "g8", f"{Q}.qzeros", 0, 255)  # the first output column's field: 255
    with pytest.raises(QuantkitError, match=f"{Q}.qzeros holds zero point 256; an 8-bit grid's zero points lie in 0..255"):
        load_model(str(tmp_path / "g8"), with_tokenizer=False)
