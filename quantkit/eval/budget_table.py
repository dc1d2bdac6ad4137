"""Bits where they matter (``--target-bpw``) against uniform formats, one run, side by side.

    python -m quantkit.eval.budget_table --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --uniform 4,3 --budgets 3.5,3.0 --calib c4 --nsamples 64 --calib-seqlen 512 \\
        --dataset wikitext2 --seqlen 512 --max-windows 16 [--rotate] [--observer mse] [--asym]

Rows: fp32; GPTQ (``--method``) with every linear at W``b`` g``--group-size`` for each ``--uniform``
width; the same method under each ``--budgets`` bit budget (each linear's bits and group size
chosen by :func:`quantkit.calibrate.sensitivity.plan_bits`).  Every row reports the bits per
weight measured on its packed linears (codes, scales, zeros, g_idx) and WikiText-2 perplexity;
the budget rows also how their formats were spread.  Writes a markdown table to ``--out``
(default ``eval/RESULTS-budget.md``: run from the repository root) and, with ``--plot``, the
size/perplexity Pareto fronts of both series.
"""

from __future__ import annotations

import argparse
import collections
import copy
import platform
import time
from pathlib import Path

import torch

from quantkit import api
from quantkit.eval.compare import pareto_front
from quantkit.eval.perplexity import perplexity
from quantkit.eval.protocol import add_protocol_args, load_protocol, write_results
from quantkit.runtime.qlinear import bits_per_weight
from quantkit.runtime.swap import pack_model


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(ap)
    ap.add_argument("--method", default="gptq", choices=("gptq", "rtn", "awq"))
    ap.add_argument("--group-size", type=int, default=64, help="The uniform rows' group size.")
    ap.add_argument("--uniform", default="4,3", help="Comma-separated bit widths of the uniform rows.")
    ap.add_argument("--budgets", default="3.5,3.0", help="Comma-separated --target-bpw values.")
    ap.add_argument("--observer", default="minmax", choices=("minmax", "mse", "imatrix-mse"))
    ap.add_argument("--asym", action="store_true", help="Asymmetric grids (default: symmetric).")
    ap.add_argument("--rotate", action="store_true", help="Rotate the residual stream first (every row).")
    ap.add_argument("--true-sequential", action="store_true", help="GPTQ: re-collect statistics after each group.")
    ap.add_argument("--out", default="eval/RESULTS-budget.md")
    ap.add_argument("--json", dest="json_out", default=None, help="Also write the results as JSON here.")
    ap.add_argument("--plot", default=None, help="Also plot perplexity against bits per weight (PNG) here.")
    return ap


def _options(args) -> dict:
    opts = {"sym": not args.asym, "observer": args.observer, "rotate": args.rotate}
    if args.method == "gptq":
        opts["true_sequential"] = args.true_sequential
    return opts


def _row(args, base, name: str, options: dict, calib, windows) -> dict:
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    res = api.compress(model, args.method, {**_options(args), **options}, calib_ids=calib)
    secs = time.perf_counter() - t0
    ppl = perplexity(model, windows)["perplexity"]
    pack_model(model, res.quantized)
    bpw = bits_per_weight(model)
    row = {"model": name, "bits_per_weight": bpw, "perplexity": ppl, "seconds": round(secs, 1)}
    alloc = res.extra.get("allocation")
    if alloc:
        spread = collections.Counter(f"W{r['bits']} {'pc' if r['group_size'] == -1 else 'g' + str(r['group_size'])}"
                                     for r in alloc["modules"])
        row["formats"] = dict(spread.most_common())
        row["allocation"] = alloc
    print(f"{name}: {bpw:.3f} bits per weight, {ppl:.3f} ({secs:.1f}s)", flush=True)
    return row


def _plot(uniform: list[dict], budget: list[dict], fp32: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for rows, label, style in ((uniform, "uniform formats", "o-"), (budget, "--target-bpw", "s-")):
        front = pareto_front(rows, "bits_per_weight", "perplexity")
        ax.plot([r["bits_per_weight"] for r in front], [r["perplexity"] for r in front], style, label=label)
        for r in rows:
            ax.annotate(r["model"].split(", ")[-1], (r["bits_per_weight"], r["perplexity"]), fontsize=7)
    ax.axhline(fp32, color="gray", linestyle=":", label="fp32")
    ax.set_xlabel("bits per weight (quantized linears, scales included)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    setup = load_protocol(args)
    base, windows, calib = setup.model, setup.windows, setup.calib
    t_start = time.perf_counter()
    fp32 = perplexity(base, windows)["perplexity"]
    print(f"fp32: {fp32:.3f}", flush=True)
    tag = args.method.upper() + (" + rotation" if args.rotate else "")
    uniform = [_row(args, base, f"{tag}, W{b} g{args.group_size}", {"bits": int(b), "group_size": args.group_size},
                    calib, windows) for b in args.uniform.split(",") if b]
    budget = [_row(args, base, f"{tag}, --target-bpw {float(b):g}", {"target_bpw": float(b)}, calib, windows)
              for b in args.budgets.split(",") if b]
    minutes = (time.perf_counter() - t_start) / 60
    grid = f"{'asymmetric' if args.asym else 'symmetric'}, {args.observer} grids"
    lines = [f"| {Path(args.model).name}, {grid} | bits per weight | WikiText-2 ppl ({args.max_windows} x {args.seqlen}) "
             "| formats chosen | compress s |", "|---|---|---|---|---|",
             f"| fp32 | 32 | {fp32:.2f} | | |"]
    for r in uniform + budget:
        formats = ", ".join(f"{k}: {v}" for k, v in r.get("formats", {}).items())
        lines.append(f"| {r['model']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.2f} | {formats} | {r['seconds']} |")
    lines.append(f"\nCalibration: {args.calib}, {args.nsamples} x {args.calib_seqlen} tokens (also the budget rows' "
                 f"sensitivities). {minutes:.1f} min on {platform.machine()}, {torch.get_num_threads()} threads.")
    out = {"fp32": fp32, "uniform": uniform, "budget": budget, "args": vars(args)}
    write_results(args, "Mixed precision under a bits-per-weight budget (issue 18)", "\n".join(lines) + "\n", out)
    if args.plot:
        _plot(uniform, budget, fp32, args.plot)
    return out


if __name__ == "__main__":
    main()
