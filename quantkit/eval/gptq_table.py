"""fp32 vs RTN vs GPTQ at 4 and 3 bits on a real model, one run, side by side.

    python -m quantkit.eval.gptq_table --model SmolLM2-135M-Instruct.Q4_1.gguf --group-size 64 \\
        --calib c4 --nsamples 64 --calib-seqlen 512 --dataset wikitext2 --seqlen 512 --max-windows 16

Prints a markdown table (perplexity, seconds per method) and checks that the packed
checkpoint of GPTQ-4 evaluated by the runtime matches the in-memory model.  The protocol
matches ../shared/ANCHORS.md: WikiText-2 test, first N windows of 512 tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

from quantkit.eval.protocol import add_protocol_args, load_protocol

from quantkit import api
from quantkit.eval.perplexity import perplexity
from quantkit.checkpoint.formats import load_model
from quantkit.runtime.qlinear import QuantLinear


def linear_bytes(model) -> tuple[int, int]:
    """(packed bytes of QuantLinear weights, fp16 bytes of the same weights)."""
    packed = fp16 = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            packed += m.weight_bytes()
            fp16 += m.in_features * m.out_features * 2
    return packed, fp16


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(ap)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--asym", action="store_true", help="Asymmetric grids (default: symmetric, as the peers' W4A16 presets).")
    ap.add_argument("--no-act-order", action="store_true",
                    help="GPTQ in natural column order (default: act-order with static groups, as quantkit and llm-compressor)")
    ap.add_argument("--observer", default="minmax", choices=("minmax", "mse", "imatrix-mse"),
                    help="How each group's grid is chosen (core.quant.compute_qparams), for both methods "
                         "(imatrix-mse: GPTQ only; the RTN rows then use mse, having no statistics).")
    ap.add_argument("--json", dest="json_out", default=None, help="Also write the results as JSON here.")
    return ap


def _compress_row(args, base, method: str, bits: int, calib, windows):
    """A copy of ``base`` quantized by ``method`` at ``bits``: ``(model, result, row)``."""
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    observer = "mse" if method == "rtn" and args.observer == "imatrix-mse" else args.observer
    opts = {"bits": bits, "group_size": args.group_size, "sym": not args.asym, "observer": observer}
    if method == "gptq" and args.no_act_order:
        opts["act_order"] = False
    res = api.compress(model, method, opts, calib_ids=calib)
    secs = time.perf_counter() - t0
    ppl = perplexity(model, windows)["perplexity"]
    order = " (no act-order)" if method == "gptq" and args.no_act_order else ""
    grid = f", {observer} grid" if observer != "minmax" else ""
    return model, res, {"model": f"{method.upper()} W{bits} g{args.group_size}{order}{grid}", "perplexity": ppl, "seconds": secs}


def _packed_check(model, tok, method: str, res, windows, ppl: float) -> dict:
    """Save ``model``, reload it with the runtime (default and reference backends): perplexities and weight bytes."""
    with tempfile.TemporaryDirectory() as d:
        api.save(model, tok, Path(d) / "ckpt", method, res)
        disk = (Path(d) / "ckpt" / "model.safetensors").stat().st_size
        loaded, _ = load_model(str(Path(d) / "ckpt"))
        packed, fp16 = linear_bytes(loaded)
        ppl_packed = perplexity(loaded, windows)["perplexity"]
        os.environ["QUANTKIT_BACKEND"] = "reference"
        loaded, _ = load_model(str(Path(d) / "ckpt"))
        ppl_ref = perplexity(loaded, windows)["perplexity"]
        os.environ.pop("QUANTKIT_BACKEND")
    return {"in_memory": ppl, "packed": ppl_packed, "rel_diff": abs(ppl_packed - ppl) / ppl,
            "packed_reference_backend": ppl_ref, "rel_diff_reference": abs(ppl_ref - ppl) / ppl,
            "linear_bytes_packed": packed, "linear_bytes_fp16": fp16, "ratio": packed / fp16,
            "safetensors_bytes": disk}


def _print_table(args, rows: list[dict], packed_check: dict | None) -> None:
    print()
    print(f"| {args.model.split('/')[-1]} | WikiText-2 ppl ({args.max_windows} x {args.seqlen} tokens) | compress s |")
    print("|---|---|---|")
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        print(f"| {r['model']} | {r['perplexity']:.2f} | {secs} |")
    if packed_check:
        print(f"\npacked GPTQ-4 checkpoint: ppl {packed_check['packed']:.4f} vs in-memory {packed_check['in_memory']:.4f} "
              f"(relative diff {packed_check['rel_diff']:.2e}; reference backend {packed_check['packed_reference_backend']:.4f}, {packed_check['rel_diff_reference']:.2e}); linear weights {packed_check['ratio']:.3f}x their fp16 bytes")


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    setup = load_protocol(args)
    base, tok, windows, calib = setup.model, setup.tokenizer, setup.windows, setup.calib
    rows = []
    t = time.perf_counter()
    fp = perplexity(base, windows)
    rows.append({"model": "fp32", "perplexity": fp["perplexity"], "seconds": None})
    print(f"fp32: {fp['perplexity']:.3f} (eval {time.perf_counter() - t:.0f}s)", flush=True)
    packed_check = None
    for bits in [int(b) for b in args.bits.split(",")]:
        for method in ("rtn", "gptq"):
            model, res, row = _compress_row(args, base, method, bits, calib, windows)
            if method == "gptq" and bits == 4:
                packed_check = _packed_check(model, tok, method, res, windows, row["perplexity"])
            rows.append(row)
            print(f"{row['model']}: {row['perplexity']:.3f} ({row['seconds']:.1f}s)", flush=True)
            del model
    _print_table(args, rows, packed_check)
    out = {"rows": rows, "packed_check": packed_check, "args": vars(args)}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
