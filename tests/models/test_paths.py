"""How a model path is classified: a missing local path is reported at once, never sent to the
Hub; a hub id that cannot be loaded says it is no local path either; weight files that are not
regular files (a FIFO, a symlink to /dev/zero) are named as such."""

import os
import re
import shutil
import socket

import pytest
from click.testing import CliRunner

from quantkit.checkpoint.formats import load_model
from quantkit.cli import cli
from quantkit.errors import QuantkitError
from quantkit.models.paths import is_hub_id, resolve_model_path


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test."""
    def no_network(*a, **k):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def test_a_missing_path_under_a_local_directory_is_not_a_hub_id(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("owner/name")
    (tmp_path / "out").mkdir()
    for path in ("out/no_such_ckpt", "./owner/name", "../owner/name", "/owner/name", "~/name", "a/b/c"):
        assert not is_hub_id(path), path
    with pytest.raises(QuantkitError, match="model path 'out/no_such_ckpt' does not exist"):
        resolve_model_path("out/no_such_ckpt")


def test_cli_reports_a_missing_local_path_at_once(tmp_path, monkeypatch, offline):
    import transformers

    def hub(*a, **k):
        raise AssertionError("the path was sent to the Hub")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", hub)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    r = CliRunner().invoke(cli, ["quantize", "out/no_such_ckpt", "-o", "out/q", "--method", "rtn", "--group-size", "-1"])
    assert r.exit_code == 1 and "Error: model path 'out/no_such_ckpt' does not exist" in r.output, r.output


def test_a_hub_id_that_cannot_be_loaded_says_it_is_not_local(tmp_path, monkeypatch, offline):
    import transformers

    def unreachable(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unreachable)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QuantkitError, match=r"model path 'owner/name' does not exist locally; tried as a Hugging Face "
                                            r"hub id: We couldn't connect"):
        load_model("owner/name")


@pytest.mark.parametrize("make,kind", [
    (lambda p: os.symlink("/dev/zero", p), "a character device (a symlink to /dev/zero)"),
    (lambda p: os.mkfifo(p), "a FIFO"),
    (lambda p: p.mkdir(), "a directory"),
])
def test_weights_that_are_not_regular_files_are_named(stories_dir, tmp_path, make, kind):
    d = tmp_path / "m"
    shutil.copytree(stories_dir, d)
    (d / "model.safetensors").unlink()
    make(d / "model.safetensors")
    with pytest.raises(QuantkitError, match=re.escape(f"model.safetensors is {kind}, not a regular file")):
        load_model(str(d))
    r = CliRunner().invoke(cli, ["quantize", str(d), "-o", str(tmp_path / "q"), "--method", "rtn", "--group-size", "-1", "--stream"])
    assert r.exit_code == 1 and f"model.safetensors is {kind}, not a regular file" in r.output, r.output
