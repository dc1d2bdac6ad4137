"""``quantkit eval tasks``: lm-evaluation-harness tasks scored by quantkit's runtime, offline on the
shipped task (and any local task YAML); the harness is optional."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from quantkit import api
from quantkit.cli import cli
from quantkit.errors import QuantkitError
from quantkit.eval.tasks import local_task

pytest.importorskip("lm_eval")


def test_shipped_task_resolves_its_data_beside_it():
    cfg = local_task("tinystories_mc")
    data = cfg["dataset_kwargs"]["data_files"]["test"]
    assert cfg["task"] == "tinystories_mc" and data.startswith("/") and data.endswith("tinystories_mc.jsonl")
    assert local_task("hellaswag") is None  # a harness task name: the harness resolves it (online)


@pytest.mark.parametrize("text,match", [(None, "does not exist"), ("task: [", "not a YAML task"), ("x: 1", "needs a 'task'")])
def test_bad_local_tasks_are_one_line_errors(tmp_path, text, match):
    path = tmp_path / "t.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(QuantkitError, match=match):
        local_task(str(path))


def test_loglikelihood_is_the_continuations_log_probability(stories):
    from quantkit.eval.tasks import make_lm

    model, tok = stories
    lm = make_lm(model, tok)

    class Req:
        args = ("Once upon a time", " there was a girl")

    (ll, greedy), = lm.loglikelihood([Req()])
    ids = tok("Once upon a time there was a girl").input_ids
    n = len(ids) - len(tok("Once upon a time").input_ids)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    expected = float(logp[-n:].gather(-1, torch.tensor(ids[-n:])[:, None]).sum())
    assert ll == pytest.approx(expected, abs=1e-4) and ll < 0 and isinstance(greedy, bool)


def test_cli_scores_the_original_and_a_w4_checkpoint(stories_dir, tmp_path):
    r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(tmp_path / "w4"), "--method", "rtn", "--bits", "4",
                                 "--group-size", "-1"])
    assert r.exit_code == 0, r.output
    acc = {}
    for name, path in (("fp32", stories_dir), ("w4", tmp_path / "w4")):
        r = CliRunner().invoke(cli, ["eval", "tasks", str(path), "--tasks", "tinystories_mc", "--json"])
        assert r.exit_code == 0, r.output
        scores = json.loads(r.stdout.strip().splitlines()[-1])["tasks"]["tinystories_mc"]
        acc[name] = scores["acc"]
        assert 0 <= scores["acc"] <= 1 and math.isclose(scores["acc"] * 32, round(scores["acc"] * 32))
    assert acc["fp32"] > 0.25  # above chance (4 choices) even for a 260K-parameter model


def test_compare_gains_task_columns(stories_dir, tiny_text, tmp_path):
    r = CliRunner().invoke(cli, ["compare", str(stories_dir), "--dataset", str(tiny_text), "--seqlen", "64",
                                 "--max-windows", "1", "--no-speed", "--tasks", "tinystories_mc", "--task-limit", "8", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout.strip().splitlines()[-1])["rows"][0]
    assert set(row["tasks"]["tinystories_mc"]) >= {"acc", "acc_norm"}


def test_without_the_harness_it_is_one_line_before_loading(stories_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    r = CliRunner().invoke(cli, ["eval", "tasks", str(stories_dir), "--tasks", "tinystories_mc"])
    assert r.exit_code == 1 and "quantkit[tasks]" in r.output
