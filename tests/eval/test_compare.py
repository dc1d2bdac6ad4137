import json

from click.testing import CliRunner

from quantkit import api
from quantkit.cli import cli
from quantkit.checkpoint.formats import load_model


def test_compare_three_checkpoints(stories_dir, tiny_text, tmp_path):
    for bits in (8, 3):
        m, tok = load_model(str(stories_dir))
        res = api.compress(m, "rtn", {"bits": bits, "group_size": -1})
        api.save(m, tok, tmp_path / f"w{bits}", "rtn", res)
    r = CliRunner().invoke(cli, ["compare", str(stories_dir), str(tmp_path / "w8"), str(tmp_path / "w3"),
                                 "--dataset", str(tiny_text), "--seqlen", "128", "--max-windows", "3", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {row["name"]: row for row in out["rows"]}
    assert out["reference"] == "stories260K"
    ref, w8, w3 = rows["stories260K"], rows["w8"], rows["w3"]
    assert ref["kl_divergence"] == 0 and ref["delta_perplexity"] == 0 and ref["same_top1"] == 1
    assert abs(ref["bits_per_weight"] - 32) < 1e-9
    assert 8 < w8["bits_per_weight"] < 8.6 and 3 < w3["bits_per_weight"] < 3.6
    assert 0 < w8["kl_divergence"] < w3["kl_divergence"]
    assert abs(w8["perplexity"] - ref["perplexity"]) < abs(w3["perplexity"] - ref["perplexity"])
    assert w3["disk_bytes"] < w8["disk_bytes"] < ref["disk_bytes"]
    assert all(row["decode_tokens_per_s"] > 0 for row in out["rows"])
