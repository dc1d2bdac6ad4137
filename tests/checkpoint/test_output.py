"""``-o OUT`` is never a directory quantkit did not write, the input or a place above the working
directory; write faults are one line naming OUT, found before the work where they can be; an
existing OUT is replaced without a moment where neither it nor the new one exists."""

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import quantkit.checkpoint.output as output
import quantkit.checkpoint.packed as packed
from quantkit import api
from quantkit.checkpoint.output import MARKER, atomic_output_dir, check_output, clean_stale
from quantkit.cli import cli
from quantkit.errors import QuantkitError

RTN = ["--method", "rtn", "--bits", "4", "--group-size", "-1"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def wipe(stories_dir, tmp_path, monkeypatch):
    """A working directory holding the input model and an unrelated file (the audit's D16 set-up)."""
    d = tmp_path / "wipe"
    shutil.copytree(stories_dir, d / "model")
    (d / "notes.txt").write_text("keep")
    monkeypatch.chdir(d)
    return d


def assert_refused(r, message, wipe):
    assert r.exit_code == 1, r.output
    assert message in r.output, r.output
    assert "Traceback" not in r.output and "internal error" not in r.output
    assert len([line for line in r.output.strip().splitlines() if line.startswith("Error")]) == 1
    assert (wipe / "notes.txt").read_text() == "keep"
    assert (wipe / "model" / "model.safetensors").is_file() and (wipe / "model" / "config.json").is_file()
    assert not [p for p in wipe.rglob(".*tmp-*")] and not [p for p in wipe.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("out,message", [
    ("", "output path is empty"),
    (".", "is the current directory or one above it"),
    ("..", "is the current directory or one above it"),
    ("model", "is the input model"),
    ("/", "is the filesystem root"),
    ("notes.txt", "is a file, not a checkpoint directory"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_protected_outputs_are_never_replaced(wipe, out, message, stream):
    extra = ["--stream"] if stream else []
    assert_refused(run("quantize", "model", "-o", out, *RTN, "--overwrite", *extra), message, wipe)


@pytest.mark.parametrize("command", [
    ["prune", "model", "--method", "magnitude"],
    ["lowrank", "model", "--method", "svd"],
    ["run", "{recipe}", "model"],
    ["distill", "--teacher", "model", "--student", "model", "--data", "{recipe}"],
    ["export", "model", "--format", "gptq"],
])
@pytest.mark.parametrize("out", ["", "."])
def test_every_writing_command_refuses_the_working_directory(wipe, command, out):
    shutil.copy(next(iter(sorted((Path(__file__).parents[2] / "recipes").glob("rtn-*.yaml")))), wipe / "r.yaml")
    args = [a.replace("{recipe}", "r.yaml") for a in command]
    message = "output path is empty" if out == "" else "is the current directory"
    assert_refused(run(*args, "-o", out, "--overwrite"), message, wipe)
    assert (wipe / "r.yaml").is_file()


def test_an_ancestor_of_the_input_or_home_is_refused(wipe, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert_refused(run("quantize", wipe / "model", "-o", wipe, *RTN, "--overwrite"), "holds the input", wipe)
    monkeypatch.setenv("HOME", str(wipe))
    assert_refused(run("quantize", wipe / "model", "-o", wipe, *RTN, "--overwrite"), "is your home directory", wipe)


def test_a_symlink_to_the_working_directory_is_refused(wipe):
    os.symlink(wipe, wipe / "link")
    assert_refused(run("quantize", "model", "-o", "link", *RTN, "--overwrite"), "is the current directory", wipe)


def test_a_directory_quantkit_did_not_write_is_refused_even_with_overwrite(wipe):
    (wipe / "other").mkdir()
    (wipe / "other" / "data.bin").write_text("x")
    for extra in ([], ["--overwrite"]):
        assert_refused(run("quantize", "model", "-o", "other", *RTN, *extra), "was not written by quantkit", wipe)
        assert (wipe / "other" / "data.bin").read_text() == "x"


def test_overwrite_replaces_what_quantkit_wrote(wipe):
    assert run("quantize", "model", "-o", "q", *RTN).exit_code == 0
    assert (wipe / "q" / MARKER).is_file()
    (wipe / "q" / "stale.txt").write_text("from the first run")
    r = run("quantize", "model", "-o", "q", *RTN)
    assert r.exit_code == 1 and "already exists; pass --overwrite" in r.output
    assert run("quantize", "model", "-o", "q", *RTN, "--overwrite").exit_code == 0
    assert not (wipe / "q" / "stale.txt").exists() and (wipe / "q" / MARKER).is_file()
    assert sorted(p.name for p in wipe.iterdir()) == ["model", "notes.txt", "q"]


@pytest.mark.parametrize("legacy", ["quant_log", "config"])
def test_checkpoints_written_before_the_marker_are_recognised(tmp_path, legacy):
    old = tmp_path / "old"
    old.mkdir()
    if legacy == "quant_log":
        (old / "quant_log.csv").write_text("module,bits\n")
    else:
        (old / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "quantkit"}}))
    check_output(old, overwrite=True)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", overwrite=True)
    (old / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    (old / "quant_log.csv").unlink(missing_ok=True)
    with pytest.raises(QuantkitError, match="not written by quantkit"):
        check_output(old, overwrite=True)


def test_a_failed_rename_keeps_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "v").write_text("old")
    real_rename = type(out).rename

    def fail_into_out(self, target):
        if self.name.startswith(".out.tmp-"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(self, target)

    monkeypatch.setattr(type(out), "rename", fail_into_out)
    with pytest.raises(OSError), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("new")
    assert (out / "v").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- write faults (root cause 13) -------------------------------------------------------------
@pytest.fixture
def no_load(monkeypatch):
    """Refusals must come before the model is loaded."""
    def fail(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(api, "load_model", fail)


def test_existing_file_and_parent_file_are_refused_before_loading(wipe, no_load):
    assert_refused(run("quantize", "model", "-o", "notes.txt", *RTN, "--overwrite"), "is a file, not a checkpoint directory", wipe)
    assert_refused(run("quantize", "model", "-o", "notes.txt/ckpt", *RTN), "cannot write notes.txt/ckpt: notes.txt is a file", wipe)


@pytest.mark.parametrize("code,reason", [(errno.EROFS, "read-only file system"), (errno.ENOSPC, "no space left on device"),
                                         (errno.EACCES, "permission denied")])
def test_an_unwritable_place_is_refused_before_loading(wipe, no_load, monkeypatch, code, reason):
    def refuse(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(output.tempfile, "mkdtemp", refuse)
    assert_refused(run("quantize", "model", "-o", "sub/ckpt", *RTN), f"cannot write sub/ckpt: {reason}", wipe)
    assert not (wipe / "sub").exists()


@pytest.mark.parametrize("code,reason", [(errno.ENOSPC, "no space left on device"), (errno.EFBIG, "file too large"),
                                         (errno.EROFS, "read-only file system")])
def test_a_fault_while_writing_is_one_line_naming_out(wipe, monkeypatch, code, reason):
    def fault(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(packed, "write_safetensors", fault)
    assert_refused(run("quantize", "model", "-o", "ckpt", *RTN), f"cannot write ckpt: {reason}", wipe)
    assert not (wipe / "ckpt").exists()


def test_a_real_file_size_limit_is_one_line(wipe):
    """D08 for real: ``ulimit -f`` (RLIMIT_FSIZE) below the checkpoint's size gives EFBIG."""
    import resource
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "quantize", "model", "-o", "ckpt", *RTN], cwd=wipe,
                       capture_output=True, text=True, preexec_fn=limit, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == "Error: cannot write ckpt: file too large (over the "\
        "file-size limit, see ulimit -f)", r.stderr
    assert sorted(p.name for p in wipe.iterdir()) == ["model", "notes.txt"]


def test_a_streamed_write_fault_keeps_the_finished_blocks(wipe, monkeypatch):
    def fault(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(api, "write_safetensors", fault)
    r = run("quantize", "model", "-o", "ckpt", *RTN, "--stream")
    assert r.exit_code == 1 and "cannot write ckpt: no space left on device (5 finished block(s) kept" in r.output, r.output
    assert not (wipe / "ckpt").exists() and (wipe / ".ckpt.partial" / "manifest.json").is_file()


def test_exports_follow_the_same_rules(wipe):
    r = run("export", "model", "--format", "gguf", "-o", "notes.txt", "--overwrite")
    assert_refused(r, "already exists and is not a GGUF file", wipe)  # a file output replaces only a GGUF file
    assert_refused(run("export", "model", "--format", "gguf", "-o", ".", "--overwrite"), "current directory", wipe)
    assert run("quantize", "model", "-o", "q", *RTN).exit_code == 0
    assert_refused(run("export", "q", "--format", "gptq", "-o", "q", "--overwrite"), "is the input q", wipe)


# ---- leftovers of a killed run (D20) ----------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_killed_runs_temporary_directories_are_cleaned(tmp_path):
    out, dead = tmp_path / "out", _dead_pid()
    (tmp_path / f".out.tmp-{dead}-abcd").mkdir()
    (tmp_path / f".out.tmp-{dead}-f00d").write_text("gguf part")
    (tmp_path / f".out.old-{dead}-beef").mkdir()  # OUT set aside by a run killed mid-replace
    (tmp_path / f".out.old-{dead}-beef" / "v").write_text("old")
    live = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / f".out.tmp-{live.pid}-cafe").mkdir()
        (tmp_path / f".other.tmp-{dead}-abcd").mkdir()
        clean_stale(out)
        assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{dead}-abcd", f".out.tmp-{live.pid}-cafe", "out"]
        assert (out / "v").read_text() == "old"
    finally:
        live.kill()
        live.wait()


def test_the_next_run_cleans_what_a_killed_one_left(wipe):
    (wipe / f".ckpt.tmp-{_dead_pid()}-x1y2").mkdir()
    assert run("quantize", "model", "-o", "ckpt", *RTN).exit_code == 0
    assert sorted(p.name for p in wipe.iterdir()) == ["ckpt", "model", "notes.txt"]
