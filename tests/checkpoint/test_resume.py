"""A streamed run killed with SIGKILL leaves no OUT; ``--resume`` finishes it with the bytes an
uninterrupted run writes, and refuses a run whose inputs or settings changed."""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from quantkit.cli import cli
from quantkit.calibrate.workdir import WorkDir, work_dir_for
from quantkit.testing import cli_killed_after_block


def _args(src, out, tiny_text, *extra):
    return ["quantize", str(src), "-o", str(out), "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib",
            str(tiny_text), "--nsamples", "6", "--seqlen", "32", "--batch-size", "4", "--stream", *extra]


def _log_without_seconds(d):
    with open(d / "quant_log.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def _assert_identical(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "quant_log.csv":  # its seconds column differs between any two runs
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    log_a, log_b = _log_without_seconds(a), _log_without_seconds(b)
    # the loss column is a float32 diagnostic whose last digits depend on the thread count of the
    # process that computed it (the killed run was a subprocess); the weights above are byte-equal
    for ra, rb in zip(log_a, log_b, strict=True):
        la, lb = ra.pop("loss"), rb.pop("loss")
        assert (la == lb) or abs(float(la) - float(lb)) <= 1e-5 * abs(float(lb)), (la, lb)
    assert log_a == log_b


def _run(args, kill_after_block=None):
    prog = ["-m", "quantkit.cli"] if kill_after_block is None else cli_killed_after_block(kill_after_block)
    return subprocess.run([sys.executable, *prog, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sigkill_then_resume_is_byte_identical(tiny_sharded, tiny_text, tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    # a real process, killed with SIGKILL right after block 1 of 4 is written
    p = _run(_args(tiny_sharded, out, tiny_text), kill_after_block=1)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists()
    manifest = json.loads((work_dir_for(out) / "manifest.json").read_text())
    assert manifest["done"] == 2 and manifest["n_blocks"] == 4
    # without --resume the unfinished run is neither lost nor silently reused
    r = CliRunner().invoke(cli, _args(tiny_sharded, out, tiny_text))
    assert r.exit_code == 1 and "holds an unfinished run" in r.output and "2 of 4 blocks done" in r.output
    # other settings are refused
    r = CliRunner().invoke(cli, _args(tiny_sharded, out, tiny_text, "--resume", "--damp", "0.02"))
    assert r.exit_code == 1 and "was started with another method settings" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, _args(tiny_sharded, out, tiny_text, "--resume", "--seed", "1"))
    assert r.exit_code == 1 and "another calibration data" in r.output
    assert not out.exists() and work_dir_for(out).exists()
    # --resume finishes blocks 2 and 3 only
    r = CliRunner().invoke(cli, _args(tiny_sharded, out, tiny_text, "--resume", "--json"))
    assert r.exit_code == 0, r.output
    assert not work_dir_for(out).exists()
    r = CliRunner().invoke(cli, _args(tiny_sharded, ref, tiny_text))
    assert r.exit_code == 0, r.output
    _assert_identical(out, ref)


def test_resume_after_the_last_block_only_assembles(tiny_sharded, tiny_text, tmp_path, monkeypatch):
    out, ref = tmp_path / "out", tmp_path / "ref"
    import quantkit.checkpoint.streamed as st

    def die(self):  # killed after every block was written, while assembling OUT
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(st.StreamHooks, "entries", die)
        r = CliRunner().invoke(cli, _args(tiny_sharded, out, tiny_text))
    assert r.exit_code != 0 and not out.exists()
    assert json.loads((work_dir_for(out) / "manifest.json").read_text())["done"] == 4
    assert not list(tmp_path.glob(".out.tmp-*"))
    calls = []
    monkeypatch.setattr(st.StreamHooks, "load_block", lambda self, i, b: calls.append(i))
    r = CliRunner().invoke(cli, _args(tiny_sharded, out, tiny_text, "--resume"))
    assert r.exit_code == 0, r.output
    assert calls == []  # no block was computed again
    monkeypatch.undo()
    assert CliRunner().invoke(cli, _args(tiny_sharded, ref, tiny_text)).exit_code == 0
    _assert_identical(out, ref)


def test_changed_input_is_refused_and_overwrite_starts_over(tiny_sharded, tiny_text, tmp_path, monkeypatch):
    import shutil

    import quantkit.checkpoint.streamed as st

    src, out = tmp_path / "m", tmp_path / "out"
    shutil.copytree(tiny_sharded, src)

    def interrupt(self, *a):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(st.StreamHooks, "entries", interrupt)
        CliRunner().invoke(cli, _args(src, out, tiny_text))
    cfg = json.loads((src / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (src / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli, _args(src, out, tiny_text, "--resume"))
    assert r.exit_code == 1 and "was started with another input model" in r.output
    r = CliRunner().invoke(cli, _args(src, out, tiny_text, "--overwrite"))
    assert r.exit_code == 0, r.output
    assert not work_dir_for(out).exists()


def test_resume_with_nothing_to_resume_starts_fresh(tiny_sharded, tiny_text, tmp_path):
    r = CliRunner().invoke(cli, _args(tiny_sharded, tmp_path / "out", tiny_text, "--resume"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_two_runs_never_write_one_output(tiny_sharded, tiny_text, tmp_path):
    out = tmp_path / "out"
    holder = WorkDir(out)
    holder.acquire()  # another run is writing OUT
    try:
        r = CliRunner().invoke(cli, _args(tiny_sharded, out, tiny_text))
        assert r.exit_code == 1 and "another quantkit run is writing" in r.output
        assert work_dir_for(out).exists()  # the other run's directory is left alone
    finally:
        holder.remove()


@pytest.mark.parametrize("flags,message", [(["--no-stream"], "--resume continues a --stream run")])
def test_resume_flag_conflicts(flags, message, tiny_sharded, tiny_text, tmp_path):
    args = [a for a in _args(tiny_sharded, tmp_path / "out", tiny_text, "--resume", *flags) if a != "--stream"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and message in r.output
