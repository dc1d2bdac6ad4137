"""The CLI through click's CliRunner, and once as a real subprocess."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from quantkit.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_quantize_save_load_eval_end_to_end(stories_dir, tiny_text, tmp_path):
    out = tmp_path / "q"
    r = run("quantize", stories_dir, "-o", out, "--method", "gptq", "--bits", 4, "--group-size", -1,
            "--calib", tiny_text, "--nsamples", 4, "--seqlen", 128, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["method"] == "gptq" and info["bits"] == 4 and info["modules"] == 35
    assert info["bytes_after"] < info["bytes_before"]
    assert (out / "quant_log.csv").is_file() and (out / "tokenizer.json").is_file()
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "quantkit" and cfg["bits"] == 4 and cfg["group_size"] == -1
    r = run("eval", "perplexity", out, "--dataset", tiny_text, "--seqlen", 256, "--max-windows", 4, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res) >= {"perplexity", "stderr", "tokens", "windows", "seqlen", "seconds"}
    assert res["windows"] == 4 and res["tokens"] == 4 * 255
    assert 3 < res["perplexity"] < 12  # fp32 is ~5.6 on this text


def test_eval_prints_llama_perplexity_style(stories_dir, tiny_text):
    r = run("eval", "perplexity", stories_dir, "--dataset", tiny_text, "--seqlen", 256, "--max-windows", 3)
    assert r.exit_code == 0, r.output
    assert "[1]" in r.stdout and "[3]" in r.stdout
    assert "Final estimate: PPL = " in r.stdout and "+/-" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["quantize", "/no/such/model", "--method", "rtn"], "does not exist"),
        (["quantize", "{empty}", "--method", "rtn"], "no config.json"),
        (["quantize", "{stories}", "--method", "nope"], "unknown method 'nope'"),
        (["quantize", "{stories}", "--method", "rtn", "--bits", "9"], "bits must be an integer from 2 to 8"),
        (["quantize", "{stories}", "--method", "rtn", "--bits", "1"], "bits must be an integer from 2 to 8"),
        (["quantize", "{stories}", "--method", "gptq", "--group-size", "-1", "--calib", "{emptyfile}", "--seqlen", "128"], "shorter than one window"),
        (["quantize", "{stories}", "--method", "gptq", "--group-size", "-1", "--calib", "{shortfile}", "--seqlen", "64"], "shorter than one window"),
        (["quantize", "{stories}", "--method", "gptq", "--group-size", "64", "--seqlen", "128"], "does not divide"),
        (["quantize", "{stories}", "--method", "rtn", "--act-order"], "does not take act_order"),
        (["quantize", "{stories}", "--method", "gptq", "--nsamples", "0"], "--nsamples must be"),
        (["quantize", "{stories}", "--method", "gptq", "--group-size", "-1", "--calib", "nosuchset", "--seqlen", "128"], "unknown dataset"),
        (["quantize", "{stories}", "--method", "gptq", "--group-size", "-1", "--seqlen", "100000"], "exceeds the model's context"),
        (["quantize", "{stories}", "--method", "gptq", "--group-size", "-1", "--calib", "{garbage}", "--seqlen", "64"], "cannot read dataset file"),
        (["run", "{recipe}", "{stories}"], "calibration.seqlen 1024 exceeds the model's context of 512 tokens"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_leaves_nothing(args, message, stories_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "emptyfile.txt").write_text("")
    (tmp_path / "shortfile.txt").write_text("Once upon a time.")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 100)  # C11
    (tmp_path / "r.yaml").write_text("calibration: {nsamples: 2, seqlen: 1024}\nsteps: [{method: gptq, group_size: -1}]\n")  # B49
    out = tmp_path / "out"
    subst = {"{stories}": str(stories_dir), "{empty}": str(tmp_path / "empty"),
             "{emptyfile}": str(tmp_path / "emptyfile.txt"), "{shortfile}": str(tmp_path / "shortfile.txt"),
             "{garbage}": str(tmp_path / "garbage.parquet"), "{recipe}": str(tmp_path / "r.yaml")}
    args = [subst.get(a, a) for a in args] + ["-o", str(out)]
    r = run(*args)
    assert r.exit_code != 0
    assert message in r.output, r.output
    assert "Traceback" not in r.output
    assert len([l for l in r.output.strip().splitlines() if l.startswith("Error")]) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_eval_bad_dataset_file(stories_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    r = run("eval", "perplexity", stories_dir, "--dataset", bad, "--seqlen", 128)
    assert r.exit_code == 1 and "is not valid JSON" in r.output


def test_existing_output_is_refused(stories_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    r = run("quantize", stories_dir, "-o", out, "--method", "rtn", "--group-size", -1)
    assert r.exit_code == 1 and "already exists" in r.output


def test_methods_lists_registry():
    r = run("methods", "--json")
    assert r.exit_code == 0
    names = json.loads(r.stdout)
    assert {"rtn", "gptq"} <= set(names)


def test_real_subprocess_quantize(stories_dir, tmp_path):
    out = tmp_path / "rtn"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "quantkit.cli", "quantize", str(stories_dir), "-o", str(out), "--method", "rtn",
                        "--bits", "8", "--group-size", "-1", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["bits"] == 8
    p = subprocess.run([sys.executable, "-m", "quantkit.cli", "quantize", "/nope", "-o", str(out / "x")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "does not exist" in p.stderr


def test_an_environment_oserror_is_said_in_plain_words(stories_dir, tmp_path, monkeypatch):
    import errno

    from quantkit.cli.jobs import MethodJob

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "x"))

    monkeypatch.setattr(MethodJob, "load", full)
    r = run("quantize", stories_dir, "-o", tmp_path / "q", "--method", "rtn", "--group-size", -1)
    assert r.exit_code == 1 and f"Error: {tmp_path / 'cache' / 'x'}: no space left on device" in r.output, r.output
    assert "internal error" not in r.output
