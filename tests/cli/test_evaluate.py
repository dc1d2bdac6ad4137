"""``eval perplexity --backend`` forces the kernel path with use_backend, only while it runs."""

import json
import os

import pytest
from click.testing import CliRunner

from quantkit.cli import cli
from quantkit.errors import QuantkitError


def test_backend_is_forced_during_the_evaluation_only(stories_dir, tiny_text, tmp_path, monkeypatch):
    from quantkit.eval import perplexity as ppl_mod
    from quantkit.runtime.backends import backend_setting

    monkeypatch.delenv("QUANTKIT_BACKEND", raising=False)
    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(out), "--method", "rtn", "--group-size", "-1"])
    assert r.exit_code == 0, r.output
    seen = []
    real = ppl_mod.perplexity
    monkeypatch.setattr(ppl_mod, "perplexity", lambda *a, **k: seen.append(backend_setting()) or real(*a, **k))
    r = CliRunner().invoke(cli, ["eval", "perplexity", str(out), "--dataset", str(tiny_text), "--seqlen", "128",
                                 "--max-windows", "2", "--backend", "reference", "--json"])
    assert r.exit_code == 0, r.output
    assert seen == ["reference"] and json.loads(r.stdout.strip().splitlines()[-1])["windows"] == 2
    assert backend_setting() == "auto" and "QUANTKIT_BACKEND" not in os.environ


def _nan_model(stories_dir, tmp_path):
    """A float copy of stories260K whose final norm holds a NaN: it loads, and computes NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan"
    shutil.copytree(stories_dir, d)
    t = load_file(str(d / "model.safetensors"))
    t["model.norm.weight"][0] = float("nan")
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_eval_of_a_model_computing_nan_is_an_error(stories_dir, tiny_text, tmp_path):
    d = _nan_model(stories_dir, tmp_path)
    for extra in ([], ["--json"]):
        r = CliRunner().invoke(cli, ["eval", "perplexity", str(d), "--dataset", str(tiny_text), "--seqlen", "64",
                                     "--max-windows", "2", *extra])
        assert r.exit_code == 1 and "Traceback" not in r.output and r.stdout == ""
        assert r.output.strip().splitlines()[-1] == ("Error: perplexity is not finite (NaN): the model computes NaN/Inf "
                                                     "logits on this data")


def test_compare_with_a_model_computing_nan_is_an_error(stories_dir, tiny_text, tmp_path):
    d = _nan_model(stories_dir, tmp_path)
    r = CliRunner().invoke(cli, ["compare", str(stories_dir), str(d), "--dataset", str(tiny_text), "--seqlen", "64",
                                 "--max-windows", "2", "--no-speed", "--json"])
    assert r.exit_code == 1 and "Traceback" not in r.output and r.stdout == ""
    assert r.output.strip().splitlines()[-1] == "Error: nan: perplexity is not finite (NaN): the model computes NaN/Inf logits on this data"


def test_compare_plot_series_tell_budget_checkpoints_from_uniform_ones(tmp_path, monkeypatch):
    """A checkpoint with an allocation.json (--target-bpw) is drawn as its own Pareto series; without
    matplotlib --plot is a one-line error."""
    import sys

    from quantkit.cli.evaluate import _pareto_plot, _series

    (tmp_path / "budget").mkdir()
    (tmp_path / "budget" / "allocation.json").write_text("{}")
    (tmp_path / "uniform").mkdir()
    assert _series(str(tmp_path / "budget")) == "--target-bpw"
    assert _series(str(tmp_path / "uniform")) == "uniform formats"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(QuantkitError, match="needs matplotlib"):
        _pareto_plot([{"name": "a", "path": str(tmp_path / "budget"), "disk_bytes": 1, "perplexity": 2.0}], str(tmp_path / "p.png"))


def test_compare_refuses_plot_without_matplotlib_before_evaluating(stories_dir, tmp_path, monkeypatch):
    """Ecosystem audit F6: the missing matplotlib is found before any model is loaded or evaluated."""
    import importlib.util

    import quantkit.cli.evaluate as ev

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(ev, "_load_all", lambda paths: pytest.fail("loaded models before refusing --plot"))
    r = CliRunner().invoke(cli, ["compare", str(stories_dir), "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 1 and "needs matplotlib" in r.output and "quantkit[plot]" in r.output


def test_compare_table_keeps_long_names_when_piped(stories_dir, tmp_path):
    """Ecosystem audit F6: piped output (not a terminal) is not cut at 80 columns."""
    import shutil

    long_a, long_b = tmp_path / "rtn-g32-sym-with-a-rather-long-name-a", tmp_path / "rtn-g32-sym-with-a-rather-long-name-b"
    for d in (long_a, long_b):
        shutil.copytree(stories_dir, d)
    r = CliRunner().invoke(cli, ["compare", str(long_a), str(long_b), "--dataset", str(stories_dir.parent / "tinystories.txt"),
                                 "--seqlen", "64", "--max-windows", "1", "--no-speed"])
    assert r.exit_code == 0, r.output
    assert long_a.name in r.output and long_b.name in r.output and "…" not in r.output
