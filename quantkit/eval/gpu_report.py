"""The GPU check's report (issue 20): its targets judged from what the run measured, and the
markdown written to eval/RESULTS-gpu.md.  Nothing here measures (:mod:`quantkit.eval.gpu_check`)."""

from __future__ import annotations

import platform

import torch

TARGETS = {"w4a16_m1_speedup": 3.0, "w4a16_m32_speedup": 1.5, "int4_decode_roofline": 0.60,
           "int4_over_bf16_decode": 3.0, "gptq_block_seconds": 20.0}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def summarize(r: dict) -> dict:
    """The issue's targets against what this run measured (None: not measured)."""
    w = [row for row in r.get("w4a16_vs_bf16", [])]
    dec = {(row["format"], row["batch"], row["cuda_graph"]): row for row in r.get("decode", [])}
    int4, bf16 = dec.get(("int4", 1, True)), dec.get(("bf16", 1, True))
    got = {"w4a16_m1_speedup": min((x["speedup"] for x in w if x["m"] == 1), default=None),
           "w4a16_m32_speedup": min((x["speedup"] for x in w if x["m"] == 32), default=None),
           "int4_decode_roofline": int4 and int4["roofline_fraction"],
           "int4_over_bf16_decode": int4 and bf16 and int4["tokens_per_s"] / bf16["tokens_per_s"],
           "gptq_block_seconds": r.get("gptq_block", {}).get("block_seconds")}
    out = {}
    for k, target in TARGETS.items():
        v = got[k]
        met = None if v is None else (v <= target if k == "gptq_block_seconds" else v >= target)
        out[k] = {"measured": v, "target": target, "met": met}
    return out


def markdown(r: dict) -> str:
    lines = [f"Device: {r['device']}. Mode: {r['mode']}. Copy bandwidth (read + write): "
             f"{r['copy_bandwidth_gb_s']:.0f} GB/s. Run: {r['seconds']:.0f} s.", ""]
    if "kernels" in r:
        bad = [k for k in r["kernels"] if not k["ok"]]
        worst = max(r["kernels"], key=lambda k: k["rel_err"])
        lines += [f"a. Kernels against their references: {len(r['kernels']) - len(bad)}/{len(r['kernels'])} within "
                  f"tolerance (worst {worst['rel_err']:.2e}: {worst['kernel']} {worst['shape']} M={worst['m']} {worst['dtype']}).", ""]
    if "w4a16_vs_bf16" in r:
        lines += ["b. W4A16 g128 against cuBLAS bf16:", "", "| shape | M | W4A16 us | bf16 us | speedup | GB/s | of copy bw |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {x['shape']} | {x['m']} | {x['w4a16_us']:.1f} | {x['bf16_us']:.1f} | {x['speedup']:.2f}x | "
                  f"{x['gb_per_s']:.0f} | {x['bandwidth_fraction']:.0%} |" for x in r["w4a16_vs_bf16"]]
        lines.append("")
    if "decode" in r:
        lines += ["c. Decode, random-weight model:", "", "| format | batch | CUDA graph | tokens/s | roofline |", "|---|---|---|---|---|"]
        lines += [f"| {x['format']} | {x['batch']} | {x['cuda_graph']} | {x['tokens_per_s']:.1f} | {x['roofline_fraction']:.0%} |"
                  for x in r["decode"]]
        lines.append("")
    if "gptq_block" in r:
        g = r["gptq_block"]
        lines += [f"d. GPTQ W4 g{g['group_size']}, one block, {g['tokens']} tokens: {g['block_seconds']:.1f} s.", ""]
    if "stories" in r and "skipped" not in r["stories"]:
        s = r["stories"]
        lines += ["e. stories260K GPTQ W4 per channel: " + ", ".join(f"{k} {v:.3f}" for k, v in s["perplexity"].items())
                  + f"; largest spread {s['max_relative_spread']:.3%} ({'within' if s['ok'] else 'OVER'} 0.5%).", ""]
    lines += ["| target | measured | wanted | met |", "|---|---|---|---|"]
    for k, v in r["targets"].items():
        m = "not measured" if v["measured"] is None else f"{v['measured']:.3g}"
        lines.append(f"| {k} | {m} | {'<=' if k == 'gptq_block_seconds' else '>='} {v['target']} | {v['met']} |")
    return "\n".join(lines) + "\n"
