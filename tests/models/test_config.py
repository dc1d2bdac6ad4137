"""Config values that make every forward NaN (or leave no context) are refused before a model is
built from them, naming the key: float loads, streamed skeletons and packed checkpoints alike."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from quantkit import api
from quantkit.checkpoint.formats import load_model
from quantkit.cli import cli
from quantkit.errors import QuantkitError
from quantkit.models.config import check_config

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("config,message", [
    ({"rms_norm_eps": NAN}, "model config rms_norm_eps = nan: must be a finite number > 0"),  # A23
    ({"layer_norm_epsilon": 0.0}, "model config layer_norm_epsilon = 0.0: must be a finite number > 0"),
    ({"norm_eps": -1e-5}, "model config norm_eps = -1e-05: must be a finite number > 0"),
    ({"rope_parameters": {"rope_theta": 0.0, "rope_type": "default"}},
     "model config rope_parameters.rope_theta = 0.0: must be a finite number > 0"),  # A24
    ({"rope_theta": INF}, "model config rope_theta = inf: must be a finite number > 0"),
    ({"rope_parameters": {"full_attention": {"rope_theta": -1}}},
     "model config rope_parameters.full_attention.rope_theta = -1: must be a finite number > 0"),
    ({"max_position_embeddings": 0}, "model config max_position_embeddings = 0: must be at least 1"),  # A22
    ({"text_config": {"hidden_size": 0}}, "model config text_config.hidden_size = 0: must be at least 1"),
    ({"initializer_range": INF}, "model config initializer_range = inf: must be a finite number"),
    ({"attention_dropout": NAN}, "model config attention_dropout = nan: must be a finite number"),
    ({"time_step_limit": [0.0, NAN]}, "model config time_step_limit[1] = nan: must be a finite number"),
])
def test_bad_values_are_refused_naming_the_key(config, message):
    with pytest.raises(QuantkitError, match=f"^{message.replace('[', '[[]').replace('.', '[.]')}$"):
        check_config(config)


@pytest.mark.parametrize("config", [
    {"time_step_limit": (0.0, INF)},  # Mamba2's bound: an infinite list item is a limit, not a broken value
    {"eps": 0.0},  # ProphetNet's label smoothing, not a norm epsilon
    {"max_position_embeddings": None, "head_dim": 0, "use_cache": False, "rope_theta": 10**400},
    {"id2label": {0: "a"}, "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 1e6, "factor": 8.0}},
])
def test_sound_values_pass(config):
    check_config(config)


def test_a_deep_config_is_walked_without_recursion():
    deep = {"rms_norm_eps": NAN}
    for _ in range(5000):
        deep = {"x": [deep]}
    check_config(deep)  # nothing reads a value 10000 levels down; only the first 32 are walked
    with pytest.raises(QuantkitError, match=r"^model config x\[0\]\.x\[0\]\.rms_norm_eps = nan"):
        check_config({"x": [{"x": [{"rms_norm_eps": NAN}]}]})


def _edited(src, dst, **edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(edit)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("edit,message", [
    ({"rms_norm_eps": NAN}, "model config rms_norm_eps = nan: must be a finite number > 0"),  # A23, A23g
    ({"rope_parameters": {"rope_theta": 0.0, "rope_type": "default"}},
     "model config rope_parameters.rope_theta = 0.0: must be a finite number > 0"),  # A24, A24g
    ({"max_position_embeddings": 0}, "model config max_position_embeddings = 0: must be at least 1"),  # A22
])
@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_quantize_refuses_the_config(stories_dir, tmp_path, edit, message, stream):
    m = _edited(stories_dir, tmp_path / "m", **edit)
    with pytest.raises(QuantkitError, match=message.replace(".", "[.]")):
        load_model(str(m))
    r = CliRunner().invoke(cli, ["quantize", str(m), "-o", str(tmp_path / "out"), "--method", "rtn", "--bits", "4",
                                 "--group-size", "-1", *stream])
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.strip().splitlines()[-1] == f"Error: {message}"
    assert not (tmp_path / "out").exists()


def test_a_top_level_rope_theta_of_zero_is_refused(stories_dir, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(stories_dir, m)
    cfg = json.loads((m / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg["rope_theta"] = 0.0  # transformers moves it into rope_parameters
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match="rope_theta = 0.0: must be a finite number > 0"):
        load_model(str(m))


def test_pickle_weights_are_checked_too(stories_dir, tmp_path):
    from safetensors.torch import load_file

    m = _edited(stories_dir, tmp_path / "m", rms_norm_eps=NAN)
    torch.save(load_file(str(m / "model.safetensors")), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()
    with pytest.raises(QuantkitError, match="rms_norm_eps = nan"):
        load_model(str(m), allow_pickle=True)


def test_a_packed_checkpoint_with_a_bad_config_is_refused(stories, tmp_path):
    model, tok = stories
    api.save(model, tok, tmp_path / "q", "rtn", api.compress(model, "rtn", dict(bits=4, group_size=-1)))
    bad = _edited(tmp_path / "q", tmp_path / "bad", rms_norm_eps=NAN)
    with pytest.raises(QuantkitError, match="rms_norm_eps = nan"):
        load_model(str(bad))
    r = CliRunner().invoke(cli, ["eval", "perplexity", str(bad), "--dataset", "x.txt", "--json"])
    assert r.exit_code == 1 and r.output.strip() == "Error: model config rms_norm_eps = nan: must be a finite number > 0"
