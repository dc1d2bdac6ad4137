"""Broken checkpoints and files get one clear error, never a traceback."""

import json
import re
import shutil

import pytest
import torch
from click.testing import CliRunner

from quantkit import api
from quantkit.cli import cli
from quantkit.errors import QuantkitError
from quantkit.checkpoint.formats import load_model


@pytest.fixture
def model_copy(stories_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(stories_dir, d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def _corrupt(d, how):
    st = d / "model.safetensors"
    if how == "truncated":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif how == "garbage":
        st.write_bytes(b"\x00garbage" * 64)
    elif how == "shapes":
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] = 200
        (d / "config.json").write_text(json.dumps(cfg))
    elif how == "badjson":
        (d / "config.json").write_text("{not json")
    elif how == "pickle":
        st.unlink()
        torch.save({}, d / "pytorch_model.bin")


@pytest.mark.parametrize("how,message", [
    ("truncated", "corrupt or truncated safetensors"),
    ("garbage", "corrupt or truncated safetensors"),
    ("shapes", "disagrees with the shapes"),
    ("badjson", "is not valid JSON"),
    ("pickle", "pickle weights"),
])
def test_broken_checkpoint_is_a_clear_error(model_copy, how, message, tmp_path):
    _corrupt(model_copy, how)
    with pytest.raises(QuantkitError, match=message):
        load_model(str(model_copy))
    r = CliRunner().invoke(cli, ["quantize", str(model_copy), "-o", str(tmp_path / "out"), "--method", "rtn", "--group-size", "-1"])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused(stories):
    model, _ = stories
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(QuantkitError, match="model.layers.2.mlp.up_proj.weight holds 1 NaN/Inf"):
        api.compress(model, "rtn", {"bits": 4, "group_size": -1})


@pytest.mark.parametrize("edit,message", [
    ({"num_hidden_layers": 7}, "config.json says 7 blocks (num_hidden_layers) but the weights hold 5"),
    ({"num_hidden_layers": 10**6}, "config.json says 1000000 blocks"),
    ({"model_type": "gpt2"}, "the checkpoint has no tensor"),  # would be a model of random weights
    ({"model_type": "bert"}, "weight(s) of the model are not stored"),
    ({"vocab_size": 10**12}, "cannot build a model"),
    ({"hidden_size": "abc"}, "bad config.json: Validation error for field 'hidden_size'"),
    ({"num_attention_heads": 0}, "bad config.json"),
])
def test_config_that_disagrees_with_the_weights(model_copy, edit, message, tmp_path):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg.update(edit)
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match=re.escape(message)):
        load_model(str(model_copy))
    r = CliRunner().invoke(cli, ["quantize", str(model_copy), "-o", str(tmp_path / "out"), "--method", "rtn", "--group-size", "-1"])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--seqlen", "0"], "--seqlen must be between 1 and"),
    (["--seqlen", "-5"], "--seqlen must be between 1 and"),
    (["--seqlen", str(10**9)], "--seqlen must be between 1 and"),
    (["--seqlen", "1"], "need nsamples >= 1 and seqlen >= 2"),
    (["--nsamples", "0"], "--nsamples must be between 1 and"),
    (["--nsamples", "-1"], "--nsamples must be between 1 and"),
    (["--nsamples", str(10**9)], "--nsamples must be between 1 and"),
    (["--nsamples", "1000000", "--seqlen", "500"], "calibration tokens is more than quantkit takes"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--seqlen", "4096"], "exceeds the model's context of 512 tokens"),
    (["--nsamples", "abc"], "is not a valid integer"),
])
def test_absurd_calibration_sizes(stories_dir, tmp_path, args, message):
    r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(tmp_path / "out"), "--method", "gptq", "--group-size", "-1",
                                 *args])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_remote_code_never_runs_unless_asked(model_copy, tmp_path):
    marker = tmp_path / "ran"
    (model_copy / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\nfrom transformers import LlamaConfig as EvilConfig\n")
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model_copy / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((model_copy / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (model_copy / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    for stream in ([], ["--stream"]):
        r = CliRunner().invoke(cli, ["quantize", str(model_copy), "-o", str(tmp_path / "out"), "--method", "rtn", "--group-size", "-1",
                                     *stream])
        assert "Traceback" not in r.output
        assert not marker.exists()  # the local llama classes were used, the shipped code never imported
        if r.exit_code == 0:
            shutil.rmtree(tmp_path / "out")
    cfg["model_type"] = "evil"  # now only the shipped code could build it
    (model_copy / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli, ["quantize", str(model_copy), "-o", str(tmp_path / "out"), "--method", "rtn", "--group-size", "-1"])
    assert r.exit_code == 1 and "Traceback" not in r.output and not marker.exists()
    assert "ships its own model code (auto_map in config.json), which quantkit runs only with --trust-remote-code" in r.output


def test_allow_pickle_loads_what_it_refused(model_copy, tmp_path):
    from safetensors.torch import load_file

    torch.save(load_file(str(model_copy / "model.safetensors")), model_copy / "pytorch_model.bin")
    (model_copy / "model.safetensors").unlink()
    args = ["quantize", str(model_copy), "-o", str(tmp_path / "out"), "--method", "rtn", "--group-size", "-1"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "pickle weights" in r.output
    r = CliRunner().invoke(cli, args + ["--allow-pickle"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_out_of_memory_is_one_line(stories_dir, tmp_path, monkeypatch):
    def oom(*a, **k):  # what torch's CPU allocator raises
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 96468992 bytes.")

    monkeypatch.setattr(api, "compress", oom)
    r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(tmp_path / "out"), "--method", "rtn", "--group-size", "-1"])
    assert r.exit_code == 1 and "out of memory; try a smaller --nsamples" in r.output and "internal error" not in r.output
    assert not (tmp_path / "out").exists()
