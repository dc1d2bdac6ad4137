"""eval/gpu_check.py (issue 20) rehearsed at toy sizes on the CPU (the Triton kernels in the
interpreter), so the one script the GPU runs cannot rot between GPU sessions."""

import json

import pytest
import torch

from quantkit.eval import gpu_check


def test_tiny_rehearsal_runs_every_part(tmp_path):
    assert gpu_check.main(["--tiny", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "RESULTS-gpu.json").read_text())
    assert r["mode"] == "tiny rehearsal" and "CPU" in r["device"]
    kernels = {k["kernel"] for k in r["kernels"]}
    assert kernels == {"w4a16", "w8a16", "w8a8"} and all(k["ok"] for k in r["kernels"])
    assert {(d["format"], d["batch"]) for d in r["decode"]} == {(f, b) for f in ("bf16", "int4", "int8") for b in (1, 2)}
    assert all(d["tokens_per_s"] > 0 for d in r["decode"])
    assert r["gptq_block"]["linears"] == 7
    assert r["stories"]["ok"]
    assert set(r["targets"]) == set(gpu_check.TARGETS)
    md = (tmp_path / "RESULTS-gpu.md").read_text()
    assert "tiny rehearsal" in md and "W4A16 g128 against cuBLAS" in md


def test_targets_are_judged_from_measurements():
    r = {"w4a16_vs_bf16": [{"m": 1, "speedup": 3.2}, {"m": 1, "speedup": 2.9}, {"m": 32, "speedup": 1.6}],
         "decode": [{"format": "int4", "batch": 1, "cuda_graph": True, "tokens_per_s": 300.0, "roofline_fraction": 0.65},
                    {"format": "bf16", "batch": 1, "cuda_graph": True, "tokens_per_s": 90.0, "roofline_fraction": 0.8}],
         "gptq_block": {"block_seconds": 25.0}}
    t = gpu_check.summarize(r)
    assert t["w4a16_m1_speedup"] == {"measured": 2.9, "target": 3.0, "met": False}  # the worst shape counts
    assert t["w4a16_m32_speedup"]["met"] and t["int4_decode_roofline"]["met"]
    assert t["int4_over_bf16_decode"]["measured"] == pytest.approx(300 / 90) and t["int4_over_bf16_decode"]["met"]
    assert t["gptq_block_seconds"]["met"] is False
    assert gpu_check.summarize({})["gptq_block_seconds"]["met"] is None  # not measured is not "met"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_full_run_needs_a_gpu_and_tiny_needs_out(tmp_path, capsys):
    assert gpu_check.main([]) == 2
    assert gpu_check.main(["--tiny"]) == 2
    assert "--tiny" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
