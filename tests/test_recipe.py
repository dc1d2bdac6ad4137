"""Recipes: validated before any work, safe YAML, every shipped recipe runs on stories260K."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli import cli
from quantkit.errors import QuantkitError
from quantkit.recipe import load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_runs_on_stories260k(recipe, stories_dir, tiny_text, tmp_path):
    rec = load_recipe(recipe)
    sets = ["calibration.dataset=" + str(tiny_text), "calibration.nsamples=4", "calibration.seqlen=64"]
    for i, step in enumerate(rec.steps):  # stories260K's MLP width 172 takes no group size but -1
        if getattr(step.config, "group_size", None) not in (None, -1):
            sets.append(f"steps.{i}.group_size=-1")
    args = ["run", str(recipe), str(stories_dir), "-o", str(tmp_path / "out"), "--json"]
    for s in sets:
        args += ["--set", s]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["steps"] == [s.method for s in rec.steps]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    if "quantization_config" in cfg:
        assert cfg["quantization_config"]["recipe"]["steps"][0]["method"] == rec.steps[0].method
    r = CliRunner().invoke(cli, ["eval", "perplexity", str(tmp_path / "out"), "--dataset", str(tiny_text), "--seqlen", "128",
                                 "--max-windows", "2", "--json"])
    assert r.exit_code == 0, r.output


def test_overrides_and_ignore_apply(stories_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - method: rtn\n    bits: 4\n    group_size: -1\n    ignore: ['mlp\\.down_proj$']\n"
                      "    overrides:\n      - {match: 'layers\\.0\\.', bits: 8}\n")
    r = CliRunner().invoke(cli, ["run", str(recipe), str(stories_dir), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    mods = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["modules"]
    assert "model.layers.1.mlp.down_proj" not in mods and len(mods) == 30
    assert mods["model.layers.0.self_attn.q_proj"]["bits"] == 8 and mods["model.layers.1.self_attn.q_proj"]["bits"] == 4
    assert "ignored" in (tmp_path / "o" / "quant_log.csv").read_text()


@pytest.mark.parametrize("data,message", [
    ({"steps": [{"method": "gptq", "bitz": 4}]}, "unknown key 'bitz' for method 'gptq'"),
    ({"steps": [{"method": "gptq", "bits": "four"}]}, "steps[0].bits must be a int"),
    ({"steps": [{"method": "gptq", "bits": 12}]}, "steps[0]: bits must be an integer from 2 to 8"),
    ({"steps": [{"method": "nope"}]}, "unknown method 'nope'"),
    ({"steps": []}, "non-empty 'steps'"),
    ({"stepz": []}, "unknown recipe key(s) stepz"),
    ({"steps": [{"bits": 4}]}, "has no 'method'"),
    ({"steps": [{"method": "rtn", "overrides": [{"bits": 8}]}]}, "needs a 'match' regex"),
    ({"steps": [{"method": "rtn", "overrides": [{"match": "x", "colour": 8}]}]}, "unknown key 'colour'"),
    ({"steps": [{"method": "rtn", "ignore": ["("]}]}, "bad ignore pattern"),
    ({"calibration": {"nsamples": -1}, "steps": [{"method": "rtn"}]}, "calibration.nsamples must be positive"),
    (["not", "a", "mapping"], "must be a YAML mapping"),
])
def test_bad_recipes_name_the_key(data, message):
    with pytest.raises(QuantkitError) as e:
        parse_recipe(data)
    assert message in str(e.value)


def test_unsafe_yaml_is_not_executed(tmp_path, stories_dir):
    recipe = tmp_path / "evil.yaml"
    recipe.write_text("steps: !!python/object/apply:os.system ['touch pwned']\n")
    r = CliRunner().invoke(cli, ["run", str(recipe), str(stories_dir), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "not valid YAML" in r.output
    assert not (tmp_path / "o").exists() and not Path("pwned").exists()
