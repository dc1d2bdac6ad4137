"""``quantkit export --format compressed-tensors``: written by the compressed-tensors library,
reloaded by transformers (``CompressedTensorsConfig(run_compressed=False)``, on the CPU) with
quantkit's own outputs; what has no exact form is refused by name."""

import json

import pytest
import torch
from click.testing import CliRunner

from quantkit import api
from quantkit.checkpoint.formats import load_model
from quantkit.cli import cli
from quantkit.runtime.backends import use_backend
from quantkit.testing import tiny_llama

pytest.importorskip("compressed_tensors")


@pytest.fixture
def tok(stories_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(stories_dir))


def _export(tmp_path, tok, method, opts, calib_ids=None):
    model = tiny_llama(0)
    api.save(model, tok, tmp_path / "qk", method, api.compress(model, method, opts, calib_ids=calib_ids, progress=False))
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qk"), "--format", "compressed-tensors", "-o", str(tmp_path / "ct"),
                                 "--json"])
    return r


def _reload(path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=CompressedTensorsConfig(run_compressed=False))


@pytest.mark.parametrize("opts", [
    {"bits": 4, "group_size": 32, "sym": True},
    {"bits": 4, "group_size": 32, "sym": False},
    {"bits": 8, "group_size": -1, "sym": True},
    {"bits": 4, "group_size": -1, "sym": False, "quantize_lm_head": True},
])
def test_weight_only_grids_reload_exactly(opts, tok, tmp_path):
    r = _export(tmp_path, tok, "rtn", opts)
    assert r.exit_code == 0, r.output
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
    weights = next(iter(qcfg["config_groups"].values()))["weights"]
    assert (weights["num_bits"], weights["symmetric"]) == (opts["bits"], opts["sym"])
    assert ("lm_head" in qcfg["ignore"]) != opts.get("quantize_lm_head", False)
    ours, _ = load_model(str(tmp_path / "qk"))
    theirs = _reload(tmp_path / "ct")
    for name, mod in ours.named_modules():  # the codes come back exactly
        if hasattr(mod, "dequantized_weight"):
            assert torch.equal(theirs.get_submodule(name).weight.float(), mod.dequantized_weight().float()), name
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), use_backend("reference"):
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)


def test_w8a8_dynamic_reloads_with_quantkit_outputs(tok, tmp_path, calib_ids):
    r = _export(tmp_path, tok, "smoothquant", {"alpha": 0.5}, calib_ids=torch.randint(0, 128, (4, 32)))
    assert r.exit_code == 0, r.output
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = next(iter(qcfg["config_groups"].values()))
    assert qcfg["format"] == "int-quantized" and group["input_activations"]["dynamic"] is True
    ours, _ = load_model(str(tmp_path / "qk"))
    theirs = _reload(tmp_path / "ct")  # transformers' dequantizing reload: exact weights, activations left float
    for name, mod in ours.named_modules():
        if type(mod).__name__ == "Int8Linear":
            w = mod.qweight.float() * mod.w_scales.float()[:, None]
            assert torch.equal(theirs.get_submodule(name).weight.float(), w), name


def test_w8a8_default_reload_quantizes_inputs_per_token(tok, tmp_path):
    """transformers' default load of the W8A8 export keeps the scheme: compressed-tensors fake-quantizes
    each linear's input per token (its grid absmax / 127.5) over the exact int8 weights; quantkit's
    Int8Linear uses absmax / 127 (vLLM's int8 kernel's). Both emulated here, module by module."""
    from transformers import AutoModelForCausalLM

    r = _export(tmp_path, tok, "smoothquant", {"alpha": 0.5}, calib_ids=torch.randint(0, 128, (4, 32)))
    assert r.exit_code == 0, r.output
    ours, _ = load_model(str(tmp_path / "qk"))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    with torch.no_grad():
        theirs(torch.randint(0, 128, (1, 4)))  # the first forward decompresses the weights
    name = "model.layers.1.mlp.down_proj"
    x = torch.randn(1, 5, ours.get_submodule(name).in_features, generator=torch.Generator().manual_seed(0)) * 3

    def emulate(mod, levels):
        w = mod.qweight.float() * mod.w_scales.float()[:, None]
        s = x.abs().amax(-1, keepdim=True) / levels
        return (torch.round(x / s).clamp(-128, 127) * s) @ w.T

    with torch.no_grad(), use_backend("reference"):
        mod = ours.get_submodule(name)
        torch.testing.assert_close(mod(x), emulate(mod, 127.0), rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs.get_submodule(name)(x), emulate(mod, 127.5), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,opts,match", [
    ("rtn", {"bits": 3, "group_size": 32}, "3-bit"),
    ("sparsegpt", {"pattern": "2:4", "packed": True}, "N:M sparsity"),
    ("asvd", {"ratio": 0.5}, "low-rank"),
    ("rtn", {"bits": 4, "group_size": 32, "act_bits": 8}, "W4A8"),
    ("rtn", {"bits": 4, "group_size": -1, "rotate": True}, "online Hadamard"),
])
def test_what_has_no_exact_form_is_refused_by_name(method, opts, match, tok, tmp_path):
    r = _export(tmp_path, tok, method, opts, calib_ids=torch.randint(0, 128, (4, 32)))
    assert r.exit_code == 1 and match in r.output and "Traceback" not in r.output
    assert not (tmp_path / "ct").exists()
