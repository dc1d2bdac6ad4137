"""The results-table scripts run end to end on stories260K (tiny settings), so they cannot rot."""

from pathlib import Path

import pytest

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
    gptq_table.main(TINY + ["--bits", "4", "--group-size", "-1", "--observer", "mse", "--json", str(out)])
    mse = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(mse) == {"fp32", "RTN W4 g-1, mse grid", "GPTQ W4 g-1, mse grid"}
    assert mse["RTN W4 g-1, mse grid"]["perplexity"] != rows["RTN W4 g-1"]["perplexity"]  # the observer reached RTN
    gptq_table.main(TINY + ["--bits", "4", "--group-size", "-1", "--observer", "imatrix-mse", "--json", str(out)])
    imx = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(imx) == {"fp32", "RTN W4 g-1, mse grid", "GPTQ W4 g-1, imatrix-mse grid"}  # RTN has no statistics
    assert imx["GPTQ W4 g-1, imatrix-mse grid"]["perplexity"] != mse["GPTQ W4 g-1, mse grid"]["perplexity"]


def test_llamacpp_comparison_skips_cleanly_without_the_peer(monkeypatch, capsys):
    import sys

    from quantkit.eval import bench_llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as on a machine without llama-cpp-python
    assert bench_llamacpp.main(["--gguf", "absent.gguf"]) == {}
    assert "not installed" in capsys.readouterr().out


def test_rotate_table_rows_reload_and_speed(tmp_path):
    import json

    from quantkit.eval import rotate_table

    out = tmp_path / "t.json"
    rotate_table.main(TINY + ["--bits", "4", "--group-size", "-1", "--speed", "--out", str(tmp_path / "t.md"),
                              "--json", str(out)])
    res = json.loads(out.read_text())
    rows = {r["model"]: r["perplexity"] for r in res["rows"]}
    assert set(rows) == {"fp32", "fp32, rotated", "RTN W4 g-1", "RTN W4 g-1 + rotation", "GPTQ W4 g-1 + rotation",
                         "GPTQ W4A8 g-1 + rotation", "GPTQ W4A4 g-1 + rotation", "GPTQ W4A4 KV4 g-1 + rotation"}
    counted = {r["model"]: r["int_matmuls"] for r in res["rows"] if "int_matmuls" in r}
    assert len(counted) == 3 and all(n >= 35 for n in counted.values())  # every linear ran integer matmuls
    assert rows["GPTQ W4A8 g-1 + rotation"] == pytest.approx(rows["GPTQ W4 g-1 + rotation"], rel=0.05)
    assert rows["fp32, rotated"] == pytest.approx(rows["fp32"], rel=1e-4)  # the rotation alone changes nothing
    assert rows["RTN W4 g-1 + rotation"] != rows["RTN W4 g-1"]
    assert res["packed_check"]["packed"] == pytest.approx(res["packed_check"]["in_memory"], rel=1e-3)
    assert res["speed"]["ratio"] > 0 and res["speed"]["rotated"]["forward"].startswith("lean")
    assert "rotation" in (tmp_path / "t.md").read_text()
    rotate_table.main(TINY + ["--speed-only", "--group-size", "-1", "--out", str(tmp_path / "s.md"), "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["rows"] == [] and res["speed"]["rotated"]["forward"] == res["speed"]["plain"]["forward"]  # same kernels
    assert "Decode" in (tmp_path / "s.md").read_text() and "| fp32" not in (tmp_path / "s.md").read_text()


def test_rotate_table_clipped_activation_rows(tmp_path):
    import json

    from quantkit.eval import rotate_table

    out = tmp_path / "t.json"
    rotate_table.main(TINY + ["--bits", "4", "--group-size", "-1", "--act-rows", "4", "--act-clip", "0.9", "--act-parts",
                              "--out", str(tmp_path / "t.md"), "--json", str(out)])
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    a4 = rows["GPTQ W4A4 g-1 + rotation, activations clipped at 0.9"]
    assert not any("A8" in r for r in rows)
    parts = [r for name, r in rows.items() if name.endswith(" only")]
    assert [r["model"].split(" on ")[1] for r in parts] == [f"{k} only" for k in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                                   "gate_proj", "up_proj", "down_proj")]
    assert sum(r["int_matmuls"] for r in parts) == a4["int_matmuls"]  # each kind once: together, the whole row
    with pytest.raises(SystemExit):
        rotate_table.main(TINY + ["--act-rows", "4,3"])


def test_budget_table_rows_measure_bits_and_plot(tmp_path):
    import json

    from quantkit.eval import budget_table

    out = tmp_path / "b.json"
    budget_table.main(TINY + ["--method", "rtn", "--uniform", "4", "--group-size", "-1", "--budgets", "3.5,2.6",
                              "--out", str(tmp_path / "b.md"), "--json", str(out)])
    res = json.loads(out.read_text())
    (u4,), (b35, b26) = res["uniform"], res["budget"]
    assert u4["model"] == "RTN, W4 g-1" and 4.0 < u4["bits_per_weight"] < 4.5
    assert b35["bits_per_weight"] <= 3.5 and b26["bits_per_weight"] <= 2.6
    assert sum(b35["formats"].values()) == 35 and b35["allocation"]["target_bpw"] == 3.5
    assert "--target-bpw 3.5" in (tmp_path / "b.md").read_text()
    from quantkit.eval.compare import pareto_front

    front = pareto_front([u4, b35, b26, {**b35, "bits_per_weight": 5.0, "perplexity": 1e9}], "bits_per_weight", "perplexity")
    assert [r["bits_per_weight"] for r in front] == sorted(r["bits_per_weight"] for r in front)
    assert all(r["perplexity"] < 1e9 for r in front)
    pytest.importorskip("matplotlib")
    png = tmp_path / "b.png"
    budget_table._plot([u4], [b35, b26], res["fp32"], str(png))
    assert png.stat().st_size > 0


def test_rotate_table_grouped_asymmetric_activation_rows(tmp_path):
    import json

    from quantkit.eval import rotate_table

    out = tmp_path / "t.json"
    rotate_table.main(TINY + ["--bits", "4", "--group-size", "-1", "--act-rows", "8,4", "--act-group-size", "4",
                              "--act-asym", "--out", str(tmp_path / "t.md"), "--json", str(out)])
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    a8, a4 = rows["GPTQ W4A8 g-1 + rotation"], rows["GPTQ W4A4 g-1 + rotation, a scale per 4 columns, asymmetric"]
    # stories260K's blocks: six linears of 64 inputs and down_proj's 172: 16 or 43 activation groups each, one
    # integer matmul per group (A8: one per linear)
    assert a4["int_matmuls"] == a8["int_matmuls"] // 7 * (6 * 16 + 43)


def test_engines_table_reads_quantkit_checkpoints_through_transformers(tmp_path):
    """Issue 21's table on stories260K: the quantkit checkpoint through from_pretrained and its
    compressed-tensors export reloaded by transformers give quantkit's perplexity (within 0.5%)."""
    import json

    pytest.importorskip("compressed_tensors")
    from quantkit.eval import engines_table

    out = tmp_path / "e.json"
    rc = engines_table.main(TINY + ["--group-size", "-1", "--out", str(tmp_path / "e.md"), "--json-out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["GPTQ W4", "SmoothQuant W8A8", "SparseGPT 2:4 + W4"]
    assert rc == 0 and all(r["within_0.5%"] for r in rows), rows
    assert rows[2]["2:4 zeros kept by the reload"] is True
    gptq = rows[0]["perplexity"]
    assert gptq["transformers from_pretrained (quantkit checkpoint)"] == pytest.approx(gptq["quantkit"], rel=1e-4)


def test_bench_families_times_both_forwards_on_each_family(tmp_path):
    """Issue 19's benchmark at toy sizes (speed is not asserted here: a benchmark's job)."""
    import json

    from quantkit.eval import bench_families

    out = tmp_path / "f.json"
    from quantkit.kernels.native.build import available

    for packed in ([], ["--packed"]):
        bench_families.main(["--families", "gemma3,llama", "--hidden", "128", "--layers", "2", "--window", "8",
                             "--prompt-len", "12", "--gen-len", "4", "--repeat", "1", "--json-out", str(out), *packed])
        rows = json.loads(out.read_text())["rows"]
        assert [r["family"] for r in rows] == ["gemma3", "llama"]
        assert all(r["decode_tokens_per_s"]["lean"] > 0 and r["decode_tokens_per_s"]["transformers"] > 0 for r in rows)
        # packed, the fast path is the one-call native step wherever the native kernels build
        assert all(r["native_step"] == (bool(packed) and available()) for r in rows)
