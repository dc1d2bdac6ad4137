"""``quantkit bench`` on a tiny random Llama: the plain functions, the click command, and one
real subprocess."""

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from quantkit.cli.evaluate import bench
from quantkit.eval.speed import bench_table, decode_bytes_per_token, run_bench, run_benches, weight_bytes
from quantkit.core.quant import QuantSpec, quantize_rtn
from quantkit.testing import tiny_opt
from quantkit.runtime.qlinear import QuantLinear

FIELDS = {"decode_tokens_per_s", "prefill_tokens_per_s", "weight_bytes", "roofline_fraction", "ttft_s",
          "peak_memory_bytes", "decode_bytes_per_token", "bandwidth_bytes_per_s", "decode_tokens_per_s_std"}


def tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def packed(model):
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, nn.Linear):
                    q, s, z = quantize_rtn(lin.weight.detach().float(), QuantSpec(4, 32, True))
                    setattr(parent, name, QuantLinear.from_codes(q, s, z, 4, 32, True, dtype=lin.weight.dtype))
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(d)
    return d


def test_bytes_per_token_counts_packed_layout_and_tied_head_once():
    f = tiny_llama(torch.bfloat16)
    # a tied lm_head reads the whole shared matrix, the embedding lookup one more row (64 bf16)
    assert decode_bytes_per_token(f) == weight_bytes(f) + 64 * 2
    q = packed(tiny_llama(torch.bfloat16))
    r = run_bench(q, prompt_len=4, gen_len=2, repeat=1, bandwidth=1e10)
    assert r["quantized_linears"] == 14 and r["backend"] == "auto:cpu"
    assert r["decode_bytes_per_token"] < decode_bytes_per_token(f)  # int4 reads ~1/4 of the linears' bytes
    assert FIELDS <= r.keys() and r["decode_tokens_per_s"] > 0
    assert r["roofline_fraction"] == pytest.approx(r["decode_tokens_per_s"] / (1e10 / r["decode_bytes_per_token"]))


def test_run_benches_interleaves_and_renders():
    res = run_benches({"f": tiny_llama(), "q": packed(tiny_llama(torch.bfloat16))}, prompt_len=3, gen_len=2, repeat=2,
                      bandwidth=1e10)
    assert set(res) == {"f", "q"} and all(r["repeat"] == 2 for r in res.values())
    table = bench_table(list(res.items()))
    assert table.row_count == 4  # a pp and a tg row per model
    from quantkit.kernels.native import build

    assert res["f"]["forward"] == "lean" and res["q"]["forward"] == ("lean-native" if build.available() else "lean")
    res = run_benches({"f": tiny_llama(), "opt": tiny_opt()}, prompt_len=3, gen_len=2, repeat=1, bandwidth=1e10)
    assert res["f"]["forward"] == "lean" and res["opt"]["forward"] == "transformers"  # unsupported: transformers'
    res = run_benches({"f": tiny_llama()}, prompt_len=3, gen_len=2, repeat=1, bandwidth=1e10, lean=False)
    assert res["f"]["forward"] == "transformers"


def test_bench_cli_json(tiny_dir):
    r = CliRunner().invoke(bench, [str(tiny_dir), "--prompt-len", "4", "--gen-len", "2", "--repeat", "2", "--json",
                                   "--dtype", "float32", "--backend", "reference"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert FIELDS <= out.keys()
    assert out["dtype"] == "float32" and out["prompt_len"] == 4 and out["repeat"] == 2 and out["forward"] == "lean"
    from quantkit.runtime.backends import backend_setting

    assert backend_setting() == "auto"  # --backend does not leak out of the command


def test_bench_cli_table_and_bad_input(tiny_dir, tmp_path):
    r = CliRunner().invoke(bench, [str(tiny_dir), "--prompt-len", "4", "--gen-len", "2", "--repeat", "1"])
    assert r.exit_code == 0, r.output
    assert "tg2" in r.output and "pp4" in r.output
    r = CliRunner().invoke(bench, [str(tiny_dir), "--gen-len", "0"])
    assert r.exit_code != 0


@pytest.mark.slow
def test_bench_subprocess(tiny_dir):
    code = "import sys; from quantkit.cli.evaluate import bench; bench(sys.argv[1:])"
    p = subprocess.run([sys.executable, "-c", code, str(tiny_dir), "--prompt-len", "3", "--gen-len", "2", "--repeat", "1",
                        "--threads", "1", "--json"], capture_output=True, text=True, timeout=300, env={**os.environ, "QUANTKIT_BACKEND": "auto"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["decode_tokens_per_s"] > 0


def test_bandwidth_is_measured_on_the_decode_threads(monkeypatch):
    """The roofline's bandwidth runs on the threads decode runs on (not every core), best of
    several reads, once per timing round (the best round kept)."""
    import quantkit.eval.speed as qb

    def no_thread_changes(n):
        raise AssertionError("measure_bandwidth must not change the thread count")

    monkeypatch.setattr(torch, "set_num_threads", no_thread_changes)
    assert qb.measure_bandwidth(nbytes=2**20, repeat=2) > 0
    monkeypatch.undo()
    calls = iter([3e9, 5e9, 4e9])
    monkeypatch.setattr(qb, "measure_bandwidth", lambda device="cpu": next(calls))
    r = run_bench(tiny_llama(), prompt_len=3, gen_len=2, repeat=2, warmup=1)
    assert r["bandwidth_bytes_per_s"] == 5e9  # one measurement per round (warm-up included), the best
    assert next(calls, None) is None  # exactly three: warm-up + two rounds
    assert 0 < r["roofline_fraction"] and r["decode_bytes_per_token"] > 0


def test_bench_kernels_report_checks_targets_and_keeps_the_rest_of_the_file(tmp_path):
    from quantkit.eval import bench_kernels as bk

    def result(tg, pp, frac=0.6):
        return {"decode_tokens_per_s": tg, "decode_tokens_per_s_std": 0.1, "prefill_tokens_per_s": pp,
                "decode_bytes_per_token": 2**20, "roofline_fraction": frac, "bandwidth_bytes_per_s": 2e10}

    res = {"fp32": result(10, 100), "bf16": result(20, 150), "int4-g64": result(25, 90, 0.3),
           "int4-g64+head": result(31, 95, 0.55), "w8a8": result(12, 190)}
    report = {"date": "today", "prompt_len": 64, "gen_len": 32, "repeat": 3, "compile": False,
              "smollm2-135m": {"results": res, "ratios": bk.ratios(res, 64), "threads": 1, "threads_probe": {1: 30.0, 2: 9.0},
                               "load_average": [(0.5, 0, 0), (0.7, 0, 0)]}}
    md = bk.markdown(report, ["--skip-1b"])
    assert "| int4-g64+head | 1 MiB | 95.0 | 31.00 ± 0.10 | 3.10 | 1.55 | 55% |" in md
    assert "int4-g64+head decode vs fp32: **3.10** (target 3: met)" in md
    assert "int4-g64 (lm_head bf16) decode vs fp32: **2.50** (target 3: NOT met)" in md
    assert "load average 0.50 at start, 0.70 at end" in md and "1: 30.0, 2: 9.0" in md
    f = tmp_path / "RESULTS.md"
    f.write_text("# Title\n\nnotes before\n")
    bk.write_markdown(str(f), md)
    bk.write_markdown(str(f), md.replace("31.00", "32.00"))  # a rerun replaces the section
    text = f.read_text()
    assert text.startswith("# Title\n\nnotes before\n") and text.count(bk.BEGIN) == 1 and "32.00 ± 0.10" in text
