"""AWQ, SmoothQuant W8A8 and KV-cache quantization on a real model, side by side with fp32,
RTN and GPTQ, in one run.

    python -m quantkit.eval.awq_sq_table --model SmolLM2-135M-Instruct.Q4_1.gguf --group-size 64 \\
        --calib c4 --nsamples 64 --calib-seqlen 512 --dataset wikitext2 --seqlen 512 --max-windows 16 \\
        --out eval/RESULTS-awq-sq-kv.md --state /tmp/awq_sq_state.json

Protocol (as ../shared/ANCHORS.md): calibrate on ``c4`` with ``nsamples x calib-seqlen`` tokens,
seed 0; perplexity on the first ``max-windows`` windows of ``seqlen`` tokens of WikiText-2 test.
Weight-only rows are symmetric ``bits``-bit with ``group-size`` columns per scale.  W8A8 rows are
evaluated from their saved checkpoint, so every linear runs :class:`quantkit.runtime.int8.Int8Linear`
(int8 x int8 -> int32; the number of ``torch._int_mm`` calls is reported).  KV rows run each
window through the cache (:class:`quantkit.runtime.kvcache.KVCachedLM`) on the fp32 model; KV
memory is measured on one ``kv-context``-token prefill.

Each row is stored in ``--state`` (JSON) as soon as it is measured; ``--rows`` picks a subset
and rows already in the state file are not re-run, so an interrupted run resumes.  Compression
time is reported as wall time and as the process's CPU time: on a machine shared with other
jobs the second is the steadier comparison.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from quantkit.eval.protocol import add_protocol_args, load_protocol

from quantkit import api
from quantkit.data import load_text, tokenize
from quantkit.eval.perplexity import perplexity
from quantkit.checkpoint.formats import load_model
from quantkit.runtime.kvcache import (
    KVCachedLM,
    KVQuantConfig,
    kv_bytes_per_token,
    kv_cache_bytes,
)

ROWS = ("fp32", "rtn", "gptq", "awq", "awq_gptq", "w8a8_naive", "smoothquant", "kv_float", "kv_int8", "kv_int4",
        "kv_int4_kivi", "kv_memory")
KV_CONFIGS = {"kv_float": None, "kv_int8": KVQuantConfig(8), "kv_int4": KVQuantConfig(4),
              "kv_int4_kivi": KVQuantConfig(4, keys="channel", group=64)}


def _count_int_mm():
    """Wrap ``torch._int_mm`` to count calls; returns (counter list, restore function)."""
    calls, real = [], torch._int_mm

    def counted(a, b):
        calls.append(1)
        return real(a, b)

    torch._int_mm = counted
    return calls, lambda: setattr(torch, "_int_mm", real)


def run_row(name: str, base, tok, calib, windows, args) -> dict:
    wq = {"bits": args.bits, "group_size": args.group_size, "sym": True}
    if name == "fp32":
        return {"label": "fp32", "perplexity": perplexity(base, windows)["perplexity"]}
    if name in ("rtn", "gptq", "awq", "awq_gptq"):
        method = {"awq_gptq": "awq+gptq"}.get(name, name)
        model = copy.deepcopy(base)
        t0, c0 = time.perf_counter(), time.process_time()
        res = api.compress(model, method, wq, calib_ids=calib)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        row = {"label": f"{method.upper()} W{args.bits} g{args.group_size}", "seconds": secs, "cpu_seconds": cpu,
               "perplexity": perplexity(model, windows)["perplexity"]}
        if name == "awq":
            alphas = [s["alpha"] for s in res.extra["awq"]["scales"]]
            row["awq"] = {"groups_scaled": len(alphas), "mean_alpha": sum(alphas) / max(1, len(alphas)),
                          "not_scaled": len(res.extra["awq"]["not_scaled"]), "clipped": len(res.extra["awq"]["clipped"])}
            with tempfile.TemporaryDirectory() as d:  # the packed checkpoint through the runtime
                api.save(model, tok, Path(d) / "ckpt", method, res)
                loaded, _ = load_model(str(Path(d) / "ckpt"))
                row["packed_perplexity"] = perplexity(loaded, windows)["perplexity"]
        return row
    if name in ("w8a8_naive", "smoothquant"):
        alpha = 0.0 if name == "w8a8_naive" else args.alpha
        model = copy.deepcopy(base)
        t0, c0 = time.perf_counter(), time.process_time()
        res = api.compress(model, "smoothquant", {"alpha": alpha}, calib_ids=calib)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        with tempfile.TemporaryDirectory() as d:
            api.save(model, tok, Path(d) / "ckpt", "smoothquant", res)
            loaded, _ = load_model(str(Path(d) / "ckpt"))
        calls, restore = _count_int_mm()
        try:
            ppl = perplexity(loaded, windows)["perplexity"]
        finally:
            restore()
        label = "naive W8A8 (alpha 0)" if alpha == 0 else f"SmoothQuant W8A8 (alpha {alpha})"
        return {"label": label, "seconds": secs, "cpu_seconds": cpu, "perplexity": ppl, "int_mm_calls": len(calls)}
    if name in KV_CONFIGS:
        kv = KV_CONFIGS[name]
        label = "float KV cache (fp32)" if kv is None else (
            f"KV int{kv.bits} " + ("per-token" if kv.keys == "token" else f"KIVI keys per-channel g{kv.group}"))
        return {"label": label, "perplexity": perplexity(KVCachedLM(base, kv), windows)["perplexity"],
                "bytes_per_token": kv_bytes_per_token(base.config, kv, 4 if kv is None else 2)}
    if name == "kv_memory":
        ids = tokenize(tok, load_text(args.dataset, "test"))[: args.kv_context].unsqueeze(0)
        out = {"context": int(ids.shape[1])}
        for key, kv in KV_CONFIGS.items():
            lm = KVCachedLM(base, kv)
            with torch.no_grad():
                lm(ids)
            out[key] = kv_cache_bytes(lm.last_cache)
        return out
    raise ValueError(name)


def markdown(state: dict, args) -> str:
    r = state["rows"]
    lines = [f"# AWQ, SmoothQuant W8A8 and KV-cache quantization on {Path(args.model).name}", "",
             f"{args.dataset} test, first {args.max_windows} windows of {args.seqlen} tokens; calibration {args.calib} "
             f"{args.nsamples} x {args.calib_seqlen} tokens, seed 0; weight-only rows symmetric {args.bits}-bit "
             f"g{args.group_size}.  Produced by `python -m quantkit.eval.awq_sq_table` ({state.get('machine', '')}).", ""]
    lines += _model_table(r, args.dataset)
    lines += [""] + [f"- {n}" for n in _notes(r)]
    if any(k in r for k in KV_CONFIGS):
        lines += _kv_table(r, args.dataset)
    if "kv_memory" in r:
        lines += _kv_memory_table(r["kv_memory"])
    return "\n".join(lines) + "\n"


def _model_table(r: dict, dataset: str) -> list[str]:
    """Perplexity and compression time of the weight (and W8A8) rows."""
    fp = r.get("fp32", {}).get("perplexity")

    def rel(p):
        return f"{100 * (p / fp - 1):+.2f}%" if fp else ""

    lines = [f"| model | {dataset} ppl | vs fp32 | compress s (wall) | compress s (CPU) |", "|---|---|---|---|---|"]
    for key in ("fp32", "rtn", "gptq", "awq", "awq_gptq", "w8a8_naive", "smoothquant"):
        if key in r:
            row = r[key]
            secs = f"{row['seconds']:.0f}" if row.get("seconds") is not None else ""
            cpu = f"{row['cpu_seconds']:.0f}" if row.get("cpu_seconds") is not None else ""
            lines.append(f"| {row['label']} | {row['perplexity']:.2f} | {rel(row['perplexity']) if key != 'fp32' else ''} "
                         f"| {secs} | {cpu} |")
    return lines


def _notes(r: dict) -> list[str]:
    """The AWQ checkpoint check, AWQ against GPTQ, and the int8 matmul counts of the W8A8 rows."""
    notes = []
    if "awq" in r and "packed_perplexity" in r["awq"]:
        a = r["awq"]
        notes.append(f"AWQ packed checkpoint through the runtime: ppl {a['packed_perplexity']:.3f} (in memory {a['perplexity']:.3f}); "
                     f"{a['awq']['groups_scaled']} groups scaled (mean alpha {a['awq']['mean_alpha']:.2f}), "
                     f"{a['awq']['not_scaled']} linears not scalable (GQA v_proj -> o_proj), {a['awq']['clipped']} clipped.")
    if "awq" in r and "gptq" in r:
        notes.append(f"AWQ vs GPTQ: ppl {r['awq']['perplexity']:.2f} vs {r['gptq']['perplexity']:.2f} "
                     f"({100 * (r['awq']['perplexity'] / r['gptq']['perplexity'] - 1):+.2f}%), "
                     f"wall time {r['awq']['seconds']:.0f} s vs {r['gptq']['seconds']:.0f} s "
                     f"({r['awq']['seconds'] / r['gptq']['seconds']:.2f}x), CPU time {r['awq']['cpu_seconds']:.0f} s vs "
                     f"{r['gptq']['cpu_seconds']:.0f} s ({r['awq']['cpu_seconds'] / r['gptq']['cpu_seconds']:.2f}x); "
                     "same calibration set, same process, one after the other.")
    for key in ("w8a8_naive", "smoothquant"):
        if key in r:
            notes.append(f"{r[key]['label']}: evaluated from its saved checkpoint, {r[key]['int_mm_calls']} int8 "
                         "`torch._int_mm` calls (every linear of every window).")
    return notes


def _kv_table(r: dict, dataset: str) -> list[str]:
    """Perplexity and bytes per token of the KV-cache rows, and how they are measured."""
    base = r.get("kv_float", {}).get("perplexity")
    lines = ["", "## KV cache (fp32 model, every window read back through the cache)", "",
             f"| cache | {dataset} ppl | vs float cache | bytes / token (all layers) |", "|---|---|---|---|"]
    for k in [k for k in KV_CONFIGS if k in r]:
        row = r[k]
        vs = f"{100 * (row['perplexity'] / base - 1):+.2f}%" if base and k != "kv_float" else ""
        lines.append(f"| {row['label']} | {row['perplexity']:.3f} | {vs} | {row['bytes_per_token']:.0f} |")
    lines.append("")
    lines.append("How the effect is measured: a plain forward over a window never reads a cache (attention uses "
                 "the fresh float keys and values), so each window is prefilled *through* the cache.  Per-token "
                 "rows quantize every token as it is written and attention reads the whole cache back, the "
                 "current tokens included: every query sees exactly the keys and values token-by-token decoding "
                 "from this cache would give it (tested: chunked and one-pass prefill store the same codes).  "
                 "KIVI rows prefill in chunks of 64 tokens, the key-group size, which reproduces decoding with "
                 "its float residual exactly.")
    lines.append("")
    lines.append("Bytes per token: float row in fp32 (the model's dtype); fp16 would be half.  Quantized rows: "
                 "codes + fp16 scale (+ uint8 zero point for the asymmetric 4-bit grid) per token and KV head; "
                 "KIVI keys carry their scales per channel per 64 tokens, and up to 63 recent tokens stay float.")
    return lines


def _kv_memory_table(m: dict) -> list[str]:
    f32 = m["kv_float"]
    lines = ["", f"KV memory measured after a {m['context']}-token prefill:", "",
             "| cache | bytes | vs fp32 cache | vs fp16 cache |", "|---|---|---|---|"]
    for k in KV_CONFIGS:
        lines.append(f"| {k} | {m[k]:,} | {m[k] / f32:.3f} | {m[k] / (f32 / 2):.3f} |")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(ap)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength.")
    ap.add_argument("--kv-context", type=int, default=2048)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"Comma-separated subset of {', '.join(ROWS)}.")
    ap.add_argument("--state", default=None, help="JSON file holding measured rows (resumable).")
    ap.add_argument("--out", default=None, help="Write the markdown table here.")
    args = ap.parse_args(argv)
    rows = [x for x in args.rows.split(",") if x]
    unknown = set(rows) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}")
    state = {"rows": {}}
    if args.state and os.path.exists(args.state):
        state = json.loads(Path(args.state).read_text())
    state["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    todo = [x for x in rows if x not in state["rows"]]
    if todo:
        setup = load_protocol(args)
        base, tok, windows, calib = setup.model, setup.tokenizer, setup.windows, setup.calib
        for name in todo:
            t0 = time.perf_counter()
            state["rows"][name] = run_row(name, base, tok, calib, windows, args)
            print(f"{name}: {json.dumps(state['rows'][name])} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if args.state:
                Path(args.state).write_text(json.dumps(state, indent=2))
    md = markdown(state, args)
    print(md)
    if args.out:
        Path(args.out).write_text(md)
    return state


if __name__ == "__main__":
    main()
