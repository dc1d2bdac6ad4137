"""The results-table scripts run end to end on stories260K (tiny settings), so they cannot rot."""

from pathlib import Path

FIX = Path(__file__).parent.parent / "fixtures"
TINY = ["--model", str(FIX / "stories260K"), "--calib", str(FIX / "tinystories.txt"), "--dataset",
        str(FIX / "tinystories.txt"), "--nsamples", "4", "--calib-seqlen", "64", "--seqlen", "64", "--max-windows", "2"]


def test_protocol_loads_model_windows_and_calibration():
    import argparse

    from quantkit.eval.protocol import add_protocol_args, load_protocol

    ap = argparse.ArgumentParser()
    add_protocol_args(ap)
    setup = load_protocol(ap.parse_args(TINY))
    assert tuple(setup.windows.shape) == (2, 64) and tuple(setup.calib.shape) == (4, 64)


def test_gptq_table_rows_and_packed_check(tmp_path):
    import json

    from quantkit.eval import gptq_table

    out = tmp_path / "t.json"
    gptq_table.main(TINY + ["--bits", "4", "--group-size", "-1", "--json", str(out)])
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fp32", "RTN W4 g-1", "GPTQ W4 g-1"}
    assert all(r["perplexity"] > 1 for r in rows.values())
    assert rows["RTN W4 g-1"]["perplexity"] > rows["fp32"]["perplexity"]
    gptq_table.main(TINY + ["--bits", "4", "--group-size", "-1", "--no-act-order", "--json", str(out)])
    natural = {r["model"]: r for r in json.loads(out.read_text())["rows"]}["GPTQ W4 g-1 (no act-order)"]
    assert natural["perplexity"] != rows["GPTQ W4 g-1"]["perplexity"]  # the flag reached the method


def test_llamacpp_comparison_skips_cleanly_without_the_peer(monkeypatch, capsys):
    import sys

    from quantkit.eval import bench_llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as on a machine without llama-cpp-python
    assert bench_llamacpp.main(["--gguf", "absent.gguf"]) == {}
    assert "not installed" in capsys.readouterr().out
