"""Dense vs magnitude vs Wanda vs SparseGPT at 50%, 2:4 and 4:8 on a real model, one run, side by side.

    python -m quantkit.eval.prune_table --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib c4 --nsamples 64 --calib-seqlen 512 --dataset wikitext2 --seqlen 512 --max-windows 16

Loads the model once and prunes a deep copy per (method, sparsity); adds SparseGPT 50% with
4-bit g64 weights quantized in the same pass, and checks that the packed 2:4 SparseGPT
checkpoint, reloaded by the runtime, evaluates like the in-memory model.  Prints a markdown
table and writes it (with per-run timings and sparsity checks) to ``--out``
(default ``eval/RESULTS-prune.md`` in the current directory: run it from the repository root).  The protocol matches ../shared/ANCHORS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from quantkit.eval.protocol import add_protocol_args, load_protocol

from quantkit import api
from quantkit.eval.perplexity import perplexity
from quantkit.checkpoint.formats import load_model
from quantkit.core.sparsity import SparsityTarget, nm_valid
from quantkit.runtime.sparse import SparseLinear

TARGETS = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}, "4:8": {"pattern": "4:8"}}
METHODS = ("magnitude", "wanda", "sparsegpt")


def check_sparsity(model, result, options: dict) -> str:
    """Verify from the model's weights that every pruned linear has exactly the asked sparsity
    (every N:M group valid); returns a one-line summary, raises on a violation."""
    target = SparsityTarget.parse(options.get("sparsity"), options.get("pattern"))
    zeros = total = 0
    for name in result.extra["sparsity"]["per_module"]:
        w = model.get_submodule(name)
        w = w.dense_weight() if isinstance(w, SparseLinear) else w.weight.detach()
        z, n = int((w == 0).sum()), w.numel()
        if target.nm:
            assert nm_valid(w, *target.nm), f"{name} breaks {target.describe()}"
        assert z >= int(target.sparsity * n), f"{name}: {z}/{n} zeros, asked {target.sparsity}"
        zeros, total = zeros + z, total + n
    sp = result.extra["sparsity"]
    return f"mask {sp['overall']:.4f} (min {sp['min']:.4f}, max {sp['max']:.4f}); zeros in weights {zeros / total:.4f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(ap)
    ap.add_argument("--group-size", type=int, default=64, help="Group size of the joint SparseGPT + 4-bit row.")
    ap.add_argument("--targets", default="50%,2:4,4:8", help="Comma-separated subset of 50%%, 2:4, 4:8.")
    ap.add_argument("--no-packed-check", action="store_true", help="Skip the packed 2:4 reload check (one more prune + eval).")
    ap.add_argument("--out", default="eval/RESULTS-prune.md")
    ap.add_argument("--json", dest="json_out", default=None, help="Also write the results as JSON here.")
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",")]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    torch.manual_seed(0)

    t_all = time.perf_counter()
    setup = load_protocol(args)
    base, tok, windows, calib = setup.model, setup.tokenizer, setup.windows, setup.calib
    t = time.perf_counter()
    dense = perplexity(base, windows)["perplexity"]
    eval_s = time.perf_counter() - t
    print(f"dense: {dense:.3f} (eval {eval_s:.0f}s)", flush=True)

    runs = []
    packed_check = None
    jobs = [(m, t, TARGETS[t]) for t in targets for m in METHODS]
    joint = ("sparsegpt", f"50% + W4 g{args.group_size}", {"sparsity": 0.5, "bits": 4, "group_size": args.group_size})
    jobs.insert(min(len(jobs), 6), joint)  # before 4:8, so an interrupted run still has it
    for method, label, opts in jobs:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        res = api.compress(model, method, opts, calib_ids=calib)
        secs = time.perf_counter() - t0
        check = check_sparsity(model, res, opts)
        ppl = perplexity(model, windows)["perplexity"]
        runs.append({"method": method, "target": label, "options": opts, "perplexity": ppl, "seconds": secs, "check": check})
        print(f"{method} {label}: {ppl:.3f} ({secs:.1f}s; {check})", flush=True)
        if method == "sparsegpt" and label == "2:4" and not args.no_packed_check:
            packed_check = _packed_roundtrip(base, tok, calib, windows, ppl)
            print(f"  packed 2:4 reloaded: {packed_check['packed']:.4f} vs {ppl:.4f}", flush=True)
        del model
        # rewritten after every run, so a long run interrupted still leaves its figures
        Path(args.out).write_text(_render(args, dense, runs, packed_check, time.perf_counter() - t_all, done=False))

    text = _render(args, dense, runs, packed_check, time.perf_counter() - t_all)
    print("\n" + text)
    Path(args.out).write_text(text)
    out = {"dense": dense, "runs": runs, "packed_check": packed_check, "args": vars(args)}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return out


def _packed_roundtrip(base, tok, calib, windows, ppl_in_memory) -> dict:
    """SparseGPT 2:4 with --packed: save, reload through the runtime, evaluate."""
    model = copy.deepcopy(base)
    res = api.compress(model, "sparsegpt", {"pattern": "2:4", "packed": True}, calib_ids=calib)
    with tempfile.TemporaryDirectory() as d:
        api.save(model, tok, Path(d) / "ckpt", "sparsegpt", res)
        disk = (Path(d) / "ckpt" / "model.safetensors").stat().st_size
        loaded, _ = load_model(str(Path(d) / "ckpt"))
        n_sparse = sum(isinstance(m, SparseLinear) for m in loaded.modules())
        ppl = perplexity(loaded, windows)["perplexity"]
    return {"packed": ppl, "in_memory": ppl_in_memory, "rel_diff": abs(ppl - ppl_in_memory) / ppl_in_memory,
            "sparse_modules": n_sparse, "safetensors_bytes": disk}


def _render(args, dense, runs, packed_check, total_s, done: bool = True) -> str:
    by = {(r["method"], r["target"]): r for r in runs}
    lines = [
        "# Pruning on SmolLM2-135M: dense vs magnitude vs Wanda vs SparseGPT",
        "",
        f"Produced by `python -m quantkit.eval.prune_table --model {Path(args.model).name}` in one run "
        f"({total_s / 60:.1f} min on {platform.machine()}, {torch.get_num_threads()} threads, shared CPU)"
        + ("." if done else " -- PARTIAL: the run was still going when this was written."),
        f"Protocol: calibration on `{args.calib}`, {args.nsamples} x {args.calib_seqlen} tokens (seed 0); "
        f"{args.dataset} test, first {args.max_windows} windows of {args.seqlen} tokens, perplexity (fp32). "
        "All 7 linears of every block pruned (embeddings and lm_head dense), as in the anchors.",
        "",
        f"| WikiText-2 ppl (dense {dense:.2f}) | 50% | 2:4 | 4:8 |",
        "|---|---|---|---|",
    ]
    for m in METHODS:
        cells = [f"{by[(m, t)]['perplexity']:.2f}" if (m, t) in by else "not run" for t in TARGETS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Prune time (s, calibration forward passes included):", "",
              "| method | 50% | 2:4 | 4:8 |", "|---|---|---|---|"]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(f"{by[(m, t)]['seconds']:.1f}" if (m, t) in by else "not run" for t in TARGETS) + " |")
    joint = [r for r in runs if "W4" in r["target"]]
    for r in joint:
        lines += ["", f"SparseGPT {r['target']} (joint pruning + quantization, one pass): ppl {r['perplexity']:.2f}, "
                      f"{r['seconds']:.1f} s."]
    if packed_check:
        lines += ["", f"Packed 2:4 SparseGPT checkpoint reloaded by the runtime ({packed_check['sparse_modules']} SparseLinear "
                      f"modules, {packed_check['safetensors_bytes'] / 1e6:.1f} MB safetensors): ppl {packed_check['packed']:.4f} "
                      f"vs in-memory {packed_check['in_memory']:.4f} (relative diff {packed_check['rel_diff']:.1e})."]
    lines += ["", "Sparsity measured on the pruned weights:", ""]
    lines += [f"- {r['method']} {r['target']}: {r['check']}" for r in runs]
    lines += ["", "Anchors (llm-compressor on this machine, PTB-calibrated, 16 x 512): SparseGPT 50% 129.0 / 2:4 343.5; "
                  "Wanda 50% 124.9 / 2:4 807.9; fp32 35.76.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
