"""Broken checkpoints and files get one clear error, never a traceback."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from quantkit import api
from quantkit.cli import cli
from quantkit.errors import QuantkitError
from quantkit.modelio import load_model


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
