"""``eval perplexity --backend`` forces the kernel path with use_backend, only while it runs."""

import json
import os

from click.testing import CliRunner

from quantkit.cli import cli


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
