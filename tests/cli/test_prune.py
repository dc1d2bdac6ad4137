"""``quantkit prune`` through click's CliRunner (and once as a real subprocess): dense, packed
N:M and jointly quantized outputs, each saved, reloaded and evaluated."""

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from quantkit.cli import cli
from quantkit.core.sparsity import nm_valid

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _last_json(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def _ppl(out, tiny_text):
    r = run("eval", "perplexity", out, "--dataset", tiny_text, "--seqlen", 256, "--max-windows", 3, "--json")
    assert r.exit_code == 0, r.output
    return _last_json(r)["perplexity"]


def _linears(model):
    return {n: m for n, m in model.named_modules() if n.split(".")[-1] in LINEARS}


def test_sparsegpt_dense_checkpoint_loads_in_plain_transformers(stories_dir, tiny_text, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sgpt"
    r = run("prune", stories_dir, "-o", out, "--method", "sparsegpt", "--sparsity", 0.5, "--calib", tiny_text,
            "--nsamples", 4, "--seqlen", 128, "--json")
    assert r.exit_code == 0, r.output
    info = _last_json(r)
    assert info["method"] == "sparsegpt" and info["modules"] == 35
    assert info["sparsity_overall"] == info["sparsity_min"] == info["sparsity_max"] == 0.5
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert "sparsity" in (out / "quant_log.csv").read_text().splitlines()[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    lins = _linears(model)
    assert len(lins) == 35
    for name, lin in lins.items():
        assert float((lin.weight == 0).float().mean()) == 0.5, name
    assert 3 < _ppl(out, tiny_text) < 40  # dense is ~5.6 on this text


def test_packed_nm_round_trips_through_the_runtime(stories_dir, tiny_text, tmp_path):
    from quantkit.checkpoint.formats import load_model
    from quantkit.runtime.sparse import SparseLinear

    common = ["--method", "wanda", "--pattern", "2:4", "--calib", tiny_text, "--nsamples", 4, "--seqlen", 128, "--json"]
    r = run("prune", stories_dir, "-o", tmp_path / "dense", *common)
    assert r.exit_code == 0, r.output
    r = run("prune", stories_dir, "-o", tmp_path / "packed", "--packed", *common)
    assert r.exit_code == 0, r.output
    assert _last_json(r)["packed"] is True and _last_json(r)["sparsity_overall"] == 0.5
    qcfg = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert len(qcfg["modules"]) == 35 and {e["kind"] for e in qcfg["modules"].values()} == {"nm_sparse"}
    dense, _ = load_model(str(tmp_path / "dense"))
    packed, _ = load_model(str(tmp_path / "packed"))
    for name, lin in _linears(packed).items():
        assert isinstance(lin, SparseLinear)
        w = _linears(dense)[name].weight.detach()
        assert nm_valid(w, 2, 4) and torch.equal(lin.dense_weight(), w)
    assert (tmp_path / "packed" / "model.safetensors").stat().st_size < (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert _ppl(tmp_path / "packed", tiny_text) == pytest.approx(_ppl(tmp_path / "dense", tiny_text), rel=1e-5)


def test_sparsegpt_with_joint_quantization_is_one_command(stories_dir, tiny_text, tmp_path):
    from quantkit.checkpoint.formats import load_model
    from quantkit.runtime.qlinear import QuantLinear

    out = tmp_path / "sq"
    r = run("prune", stories_dir, "-o", out, "--method", "sparsegpt", "--sparsity", 0.5, "--bits", 4, "--group-size", -1,
            "--calib", tiny_text, "--nsamples", 4, "--seqlen", 128, "--json")
    assert r.exit_code == 0, r.output
    assert _last_json(r)["bits"] == 4 and _last_json(r)["group_size"] == -1
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {e["kind"] for e in qcfg["modules"].values()} == {"quant"}
    model, _ = load_model(str(out))
    for name, lin in _linears(model).items():
        assert isinstance(lin, QuantLinear)
        assert float((lin.dequantized_weight() == 0).float().mean()) >= 0.5, name
    assert 3 < _ppl(out, tiny_text) < 60


def test_magnitude_needs_no_calibration_and_prints_a_table(stories_dir, tmp_path):
    r = run("prune", stories_dir, "-o", tmp_path / "mag", "--method", "magnitude", "--pattern", "1:4")
    assert r.exit_code == 0, r.output
    assert "sparsity_overall" in r.stdout and "0.7500" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pattern", "3:2"], "0 < N < M"),
        (["--pattern", "0:4"], "0 < N < M"),
        (["--pattern", "two:four"], "must look like N:M"),
        (["--sparsity", "1.5"], "sparsity must be a fraction in (0, 1)"),
        (["--sparsity", "0"], "sparsity must be a fraction in (0, 1)"),
        (["--sparsity", "-0.2"], "sparsity must be a fraction in (0, 1)"),
        (["--sparsity", "0.5", "--pattern", "2:4"], "not both"),
        (["--packed"], "needs an N:M pattern"),
        (["--pattern", "4:8"], "does not divide model.layers.0.mlp.down_proj's 172"),
        (["--sparsity", "0.5", "--bits", "4", "--group-size", "64"], "does not divide"),
        (["--method", "wanda", "--bits", "4"], "does not take bits"),
        (["--method", "gptq"], "not a pruning method"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--nsamples", "0"], "--nsamples must be"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_leaves_nothing(args, message, stories_dir, tiny_text, tmp_path):
    out = tmp_path / "out"
    r = run("prune", stories_dir, "-o", out, "--calib", tiny_text, "--nsamples", 2, "--seqlen", 64, *args)
    assert r.exit_code != 0
    assert message in r.output, r.output
    assert "Traceback" not in r.output
    assert len([line for line in r.output.strip().splitlines() if line.startswith("Error")]) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_existing_output_is_refused(stories_dir, tmp_path):
    (tmp_path / "q").mkdir()
    r = run("prune", stories_dir, "-o", tmp_path / "q", "--method", "magnitude")
    assert r.exit_code == 1 and "already exists" in r.output


def test_real_subprocess_prune(stories_dir, tmp_path):
    out = tmp_path / "mag"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "quantkit.cli", "prune", str(stories_dir), "-o", str(out), "--method", "magnitude",
                        "--pattern", "2:4", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["sparsity_overall"] == 0.5
    p = subprocess.run([sys.executable, "-m", "quantkit.cli", "prune", str(stories_dir), "-o", str(out / "x"), "--pattern", "3:2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "0 < N < M" in p.stderr
    assert not (out / "x").exists()
