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


# ---- hostile YAML (audit root causes 5 and 14) --------------------------------------------------

def _bomb(levels: int) -> str:
    """The audit's alias bomb: each level a list of 9 aliases of the one before (400 bytes at 9)."""
    names = "abcdefghij"
    text = "steps:\n  - &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n"
    for i in range(1, levels - 1):
        text += f"  - &{names[i]} [" + ",".join([f"*{names[i - 1]}"] * 9) + "]\n"
    return text + "calibration:\n  dataset: [" + ",".join([f"*{names[levels - 2]}"] * 9) + "]\n"


def test_alias_bomb_is_refused_at_once(tmp_path):
    import time

    recipe = tmp_path / "bomb9.yaml"
    recipe.write_text(_bomb(9))
    t0 = time.perf_counter()
    with pytest.raises(QuantkitError) as e:
        load_recipe(recipe)
    assert time.perf_counter() - t0 < 1
    assert str(e.value) == f"recipe {recipe}: recipes may not use YAML anchors/aliases (line 3)"


def test_alias_in_a_set_value_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [{method: rtn}]\n")
    with pytest.raises(QuantkitError, match=r"--set steps.0.ignore: recipes may not use YAML anchors/aliases"):
        load_recipe(recipe, ("steps.0.ignore=[&a x, *a]",))


@pytest.mark.parametrize("text", [
    "steps: " + "[" * 100_000 + "]" * 100_000 + "\n",  # B37: a 100k-deep flow sequence
    "steps: " + "{k: " * 20_000 + "1" + "}" * 20_000 + "\n",  # B38: a 20k-deep mapping
    "steps:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 100)),  # block style
], ids=["sequence", "mapping", "block"])
def test_deep_nesting_is_one_line(tmp_path, text):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text(text)
    with pytest.raises(QuantkitError, match=r"recipe nesting deeper than 32 levels \(line \d+\)$"):
        load_recipe(recipe)


def test_messages_quote_long_values_as_excerpts():
    bomb = [["lol"] * 9]
    for _ in range(5):  # what a 7-level alias bomb loads to: a repr of 3.7 MB (34.7 MB in the audit's B36)
        bomb = [bomb] * 9
    for data in ({"calibration": {"dataset": bomb}, "steps": [{"method": "rtn"}]},
                 {"steps": [{"method": "rtn", "bits": bomb}]},
                 {"steps": [{"method": "magnitude", "sparsity": bomb}]},  # no default to take a type from
                 {"steps": [{"method": "rtn", "overrides": [{"match": "x", "bits": bomb}]}]},
                 {"steps": [{"method": "rtn", "overrides": [{"match": bomb, "bits": 8}]}]},
                 {"steps": [{"method": "magnitude", "pattern": "x" * 10**6}]},
                 {"steps": [{"method": "x" * 10**6}]},
                 {"steps": [{"method": "rtn", "k" * 10**6: 1}]},
                 {"k" * 10**6: 1, "steps": [{"method": "rtn"}]}):
        with pytest.raises(QuantkitError) as e:
            parse_recipe(data)
        # one line: the excerpt of the value (at most ~50 characters) and, for a key, the allowed keys
        assert len(str(e.value)) < 300 and "\n" not in str(e.value), str(e.value)[:400]


@pytest.mark.parametrize("text,message", [
    ("steps: [{method: rtn, bits: " + "1" * 5000 + "}]\n", "is not valid YAML: Exceeds the limit (4300 digits)"),
    ("calibration: {nsamples: 0x" + "F" * 3000 + "}\nsteps: [{method: rtn}]\n", "nsamples x seqlen = <an integer of"),
    ("calibration: {seed: 0x" + "F" * 30 + "}\nsteps: [{method: rtn}]\n", "seed must be between"),
    ("description: 2001-13-45\nsteps: [{method: rtn}]\n", "is not valid YAML: month must be in 1..12"),
])
def test_huge_or_impossible_values_are_one_line(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(QuantkitError) as e:
        load_recipe(recipe)
    assert message in str(e.value) and len(str(e.value)) < 300


# ---- steps compose in order or are refused (audit root cause 6) ------------------------------

def _steps(*steps):
    return {"calibration": {"nsamples": 4, "seqlen": 64}, "steps": list(steps)}


RTN4 = {"method": "rtn", "bits": 4, "group_size": -1}
PRUNE = {"method": "magnitude", "sparsity": 0.5}


@pytest.mark.parametrize("steps,message", [
    ([RTN4, PRUNE], "steps[1] (magnitude) prunes after steps[0] (rtn) stored its compressed weights, which the checkpoint "
                    "keeps: the zeros would be lost; prune first: steps [magnitude, rtn]"),
    ([{"method": "sparsegpt", "bits": 4}, {"method": "wanda"}], "prune first: steps [wanda, sparsegpt]"),
    ([{"method": "svd", "ratio": 0.5}, RTN4], "steps[1] (rtn) comes after the low-rank step steps[0] (svd), whose "
                                              "factorized linears no later step can change; put the low-rank step last: steps [rtn, svd]"),
    ([{"method": "gptq"}, {"method": "smoothquant", "ignore": ["down_proj"]}],
     "steps[1] (smoothquant) folds its scales into the linears it ignores (['down_proj']), which steps[0] (gptq) stored"),
], ids=["quantize-prune", "sparsegpt-wanda", "svd-rtn", "gptq-smoothquant-ignoring"])
def test_steps_whose_work_the_checkpoint_would_lose_are_refused(steps, message):
    with pytest.raises(QuantkitError) as e:
        parse_recipe(_steps(*steps))
    assert message in str(e.value)


@pytest.mark.parametrize("steps", [
    [PRUNE, RTN4],
    [{"method": "gptq"}, {"method": "rtn", "bits": 8}],  # B52: re-quantizes the rounded weights
    [{"method": "gptq"}, {"method": "smoothquant"}],  # B54
    [{"method": "gptq"}, {"method": "svd", "ratio": 0.5}],  # B55: factors of the rounded weights
    [{"method": "smoothquant", "ignore": ["down_proj"]}, {"method": "gptq"}],
    [{"method": "gptq", "ignore": ["down_proj"]}, {"method": "awq", "ignore": ["down_proj"]}],
    [{"method": "rtn", "bits": 8}, {"method": "wanda", "pattern": "2:4", "packed": True}],
])
def test_steps_that_compose_are_accepted(steps):
    assert len(parse_recipe(_steps(*steps)).steps) == 2


def test_quantize_then_prune_is_refused_before_the_model_is_loaded(tmp_path):
    recipe = tmp_path / "quant_prune.yaml"
    recipe.write_text("steps:\n  - {method: rtn, bits: 4, group_size: -1}\n  - {method: magnitude, sparsity: 0.5}\n")
    r = CliRunner().invoke(cli, ["run", str(recipe), str(tmp_path / "no_model_here"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == ["Error: steps[1] (magnitude) prunes after steps[0] (rtn) stored its compressed "
                                             "weights, which the checkpoint keeps: the zeros would be lost; prune first: "
                                             "steps [magnitude, rtn]"]
    assert not (tmp_path / "o").exists()


def test_prune_then_quantize_keeps_the_zeros_in_the_checkpoint(stories_dir, tmp_path):
    import torch

    from quantkit.checkpoint.formats import load_model
    from quantkit.methods.magnitude import magnitude_prune
    from quantkit.core.sparsity import SparsityTarget

    recipe = tmp_path / "prune_quant.yaml"
    recipe.write_text("steps:\n  - {method: magnitude, sparsity: 0.5}\n  - {method: rtn, bits: 4, group_size: -1}\n")
    r = CliRunner().invoke(cli, ["run", str(recipe), str(stories_dir), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    float_model, _ = load_model(str(stories_dir), with_tokenizer=False)
    saved, _ = load_model(str(tmp_path / "o"), with_tokenizer=False)
    modules = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["modules"]
    assert len(modules) == 35 and {m["bits"] for m in modules.values()} == {4}
    for name in modules:
        w = saved.get_submodule(name).dequantized_weight()  # [out, in]
        _, pruned, _ = magnitude_prune(float_model.get_submodule(name).weight.detach(), SparsityTarget(0.5))
        assert torch.all(w[pruned] == 0), name  # every weight the pruning step zeroed is zero in the checkpoint
        assert float((w == 0).float().mean()) >= 0.5  # RTN alone leaves ~15% zeros


# ---- calibration settings (audit root cause 11) -------------------------------------------------

def test_calibration_seqlen_beyond_the_context_is_refused_like_the_cli(stories, tiny_text):
    from quantkit.recipe import run_recipe

    model, tok = stories
    rec = parse_recipe({"calibration": {"dataset": str(tiny_text), "nsamples": 2, "seqlen": 1024},
                        "steps": [{"method": "gptq", "group_size": -1}]})
    with pytest.raises(QuantkitError, match=r"^calibration.seqlen 1024 exceeds the model's context of 512 tokens$"):
        run_recipe(rec, model, tok)
    rec = parse_recipe({"calibration": {"seqlen": 1024}, "steps": [{"method": "rtn", "group_size": -1}]})
    assert run_recipe(rec, model, tok).quantized  # no step calibrates: the setting is unused
