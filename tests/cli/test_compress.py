"""The one runner every checkpoint-writing command goes through (quantkit.cli.compress.execute)."""

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from quantkit.cli.compress import execute
from quantkit.cli.jobs import Job
from quantkit.errors import QuantkitError


class FakeJob(Job):
    label, title, as_json, last = "fake", "quantkit fake", True, ("modules",)

    def __init__(self, refuse=False):
        self.calls, self.refuse = [], refuse

    def check(self):
        self.calls.append("check")
        if self.refuse:
            raise QuantkitError("refused")

    def load(self):
        self.calls.append("load")

    def compress(self, update):
        self.calls.append("compress")
        update(1, 2, "half")
        update(2)
        return {"n": 7}

    def save(self, res):
        self.calls.append("save")

    def payload(self, res):
        return {"output": "/x", "modules": res["n"], "bytes_after": 3}


def _run(job):
    @click.command()
    def cmd():
        execute(job)

    return CliRunner().invoke(cmd, [])


def test_runner_checks_loads_compresses_saves_and_reports_in_order():
    job = FakeJob()
    r = _run(job)
    assert r.exit_code == 0, r.output
    assert job.calls == ["check", "load", "compress", "save"]
    payload = json.loads(r.stdout.strip().splitlines()[-1])
    assert list(payload) == ["output", "bytes_after", "seconds", "peak_rss_bytes", "modules"]  # `last` goes last
    assert payload["modules"] == 7 and payload["seconds"] >= 0 and payload["peak_rss_bytes"] > 0


def test_a_refused_job_does_no_work():
    job = FakeJob(refuse=True)
    r = _run(job)
    assert r.exit_code != 0 and job.calls == ["check"]


@pytest.mark.parametrize("args,message", [
    (["prune", "{model}", "--sparsity", "0.5", "--pattern", "2:4"], "give --sparsity or --pattern, not both"),
    (["lowrank", "{model}", "--ratio", "0.5", "--rank", "4"], "give one of --ratio, --rank and --energy, not --ratio and --rank"),
    (["lowrank", "{model}", "--method", "rtn"], "'rtn' is not a low-rank method; low-rank methods: asvd, svd"),
    (["quantize", "{model}", "--method", "rtn", "--nsamples", "0"], "--nsamples must be between 1 and 1000000, got 0"),
    (["run", "{recipe}", "{model}", "--set", "steps.0.bits=9"], "bits"),
    (["distill", "--teacher", "{model}", "--student", "{model}", "--lr", "0"], "--lr and --temperature must be positive"),
])
def test_each_command_refuses_before_loading(args, message, stories_dir, tmp_path, monkeypatch):
    from quantkit import api
    from quantkit.cli import cli
    from quantkit.models import load

    for module in (api, load):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "gptq-w4-g64.yaml"
    args = [{"{model}": str(stories_dir), "{recipe}": str(recipe)}.get(a, a) for a in args]
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and message in r.output, r.output
    assert not (tmp_path / "out").exists()
