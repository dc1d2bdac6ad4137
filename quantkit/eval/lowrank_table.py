"""fp32 vs plain SVD vs activation-aware SVD at the same parameter ratio, then distillation of
the activation-aware student from the original, on a real model, one run, side by side.

    python -m quantkit.eval.lowrank_table --model SmolLM2-135M-Instruct.Q4_1.gguf --ratio 0.8 \\
        --calib c4 --nsamples 64 --calib-seqlen 512 --dataset wikitext2 --seqlen 512 --max-windows 16 \\
        --distill-steps 200 --distill-seqlen 128 --json eval/lowrank_table.json

Prints a markdown table (perplexity, parameters kept, seconds per row), checks that the saved
low-rank checkpoint evaluated by the runtime matches the in-memory model, and distills the
``asvd`` student from the original on the calibration text (held-out: the evaluation split),
saving and reloading it exactly as ``quantkit distill`` does.  ``--methods`` picks the rows:
``svd``, ``asvd`` (SVD-LLM whitening) and ``asvd-act`` (ASVD activation scaling).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from quantkit.eval.protocol import add_protocol_args, load_protocol

from quantkit import api
from quantkit.data import calibration_samples
from quantkit.distill import distill, save_student
from quantkit.eval.perplexity import perplexity
from quantkit.models.paths import read_quantization_config
from quantkit.checkpoint.formats import load_model

_METHODS = {"svd": ("svd", {}), "asvd": ("asvd", {}), "asvd-act": ("asvd", {"scaling": "act"})}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(ap)
    ap.add_argument("--ratio", type=float, default=0.8, help="Fraction of the factorized layers' parameters kept.")
    ap.add_argument("--methods", default="svd,asvd,asvd-act")
    ap.add_argument("--distill-steps", type=int, default=200, help="0 skips distillation.")
    ap.add_argument("--distill-seqlen", type=int, default=128)
    ap.add_argument("--distill-batch", type=int, default=4)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--workdir", default=None, help="Keep the asvd checkpoints (before/after distillation) here.")
    ap.add_argument("--json", dest="json_out", default=None, help="Also write the results as JSON here.")
    return ap


def _fp32_row(base, windows) -> dict:
    t = time.perf_counter()
    fp = perplexity(base, windows)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"fp32: {fp['perplexity']:.3f} (eval {time.perf_counter() - t:.0f}s)", flush=True)
    return {"model": "fp32", "perplexity": fp["perplexity"], "param_ratio": 1.0, "model_params": n_params, "seconds": None}


def _compress_row(args, base, label: str, calib, windows):
    """A copy of ``base`` factorized by the method of row ``label``: ``(model, result, row)``."""
    method, extra = _METHODS[label]
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    res = api.compress(model, method, {"ratio": args.ratio, **extra}, calib_ids=calib)
    secs = time.perf_counter() - t0
    s = res.extra["lowrank"]
    ppl = perplexity(model, windows)["perplexity"]
    row = {"model": f"{label} {args.ratio:.0%}", "perplexity": ppl, "param_ratio": s["ratio"],
           "model_params": s["model_params_after"], "seconds": secs}
    print(f"{row['model']}: {ppl:.3f} (kept {s['ratio']:.4f} of the factorized layers, {s['ratio_model']:.4f} "
          f"of the model; {secs:.0f}s)", flush=True)
    return model, res, row


def _saved_check(model, tok, res, ckpt: Path, windows, ppl: float) -> dict:
    """Save the ``asvd`` model and check that the runtime's reload computes the same logits."""
    api.save(model, tok, ckpt, "asvd", res, overwrite=True)
    loaded, _ = load_model(str(ckpt))
    with torch.no_grad():
        same = torch.equal(loaded(input_ids=windows[:1]).logits, model(input_ids=windows[:1]).logits)
    print(f"saved asvd checkpoint: logits equal to the in-memory model: {same}", flush=True)
    return {"logits_equal": same, "in_memory": ppl, "safetensors_bytes": (ckpt / "model.safetensors").stat().st_size}


def _print_table(args, rows: list[dict], packed_check: dict | None, distilled: dict | None) -> None:
    print()
    print(f"| {args.model.split('/')[-1]} | WikiText-2 ppl ({args.max_windows} x {args.seqlen} tokens) "
          f"| params kept (factorized layers) | model params | s |")
    print("|---|---|---|---|---|")
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        print(f"| {r['model']} | {r['perplexity']:.2f} | {r['param_ratio']:.4f} | {r['model_params'] / 1e6:.1f}M | {secs} |")
    if packed_check:
        print(f"\nsaved asvd checkpoint reloaded by the runtime: logits equal to the in-memory model: {packed_check['logits_equal']}")
    if distilled:
        d = distilled["report"]
        print(f"distillation: {d['steps']} steps x {d['batch_size']} x {d['seqlen']} tokens of {args.calib} "
              f"({d['tokens']} tokens), lr {d['lr']:g}, {d['seconds'] / 60:.1f} min; WikiText-2 ppl "
              f"{distilled['ppl_before']:.2f} -> {distilled['ppl_after']:.2f}; held-out KD {d['heldout_kd_before']:.4f} "
              f"-> {d['heldout_kd_after']:.4f}")


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    torch.manual_seed(0)

    setup = load_protocol(args)
    base, tok, windows, calib = setup.model, setup.tokenizer, setup.windows, setup.calib
    rows = [_fp32_row(base, windows)]
    packed_check, distilled = None, None
    with tempfile.TemporaryDirectory() as tmp:
        if args.workdir:
            tmp = args.workdir
            Path(tmp).mkdir(parents=True, exist_ok=True)
        for label in args.methods.split(","):
            model, res, row = _compress_row(args, base, label, calib, windows)
            rows.append(row)
            if label == "asvd":
                ckpt = Path(tmp) / "asvd"
                packed_check = _saved_check(model, tok, res, ckpt, windows, row["perplexity"])
                if args.distill_steps:
                    distilled = _distill(args, base, tok, ckpt, Path(tmp) / "asvd-kd", windows, res.extra["lowrank"],
                                         row["perplexity"])
                    rows.append(distilled["row"])
            del model
    _print_table(args, rows, packed_check, distilled)
    out = {"rows": rows, "packed_check": packed_check, "args": vars(args),
           "distill": {k: v for k, v in distilled.items() if k != "row"} if distilled else None}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str))
    return out


def _distill(args, teacher, tok, ckpt: Path, out: Path, windows, summary: dict, ppl_before: float) -> dict:
    """Distill the saved ``asvd`` student from ``teacher``, save it as ``quantkit distill`` does, reload, evaluate."""
    student, _ = load_model(str(ckpt))
    ids = calibration_samples(tok, args.calib, args.distill_steps * args.distill_batch, args.distill_seqlen, seed=1)
    heldout = calibration_samples(tok, args.calib, 4, args.distill_seqlen, seed=2)
    last = [time.perf_counter()]

    def progress(i, n, loss):
        if i % 10 == 0 or i == n:
            print(f"  distill step {i}/{n}: kd {loss:.4f} ({time.perf_counter() - last[0]:.0f}s)", flush=True)
            last[0] = time.perf_counter()

    rep = distill(teacher, student, ids, steps=args.distill_steps, batch_size=args.distill_batch, lr=args.distill_lr,
                  heldout=heldout, progress=progress)
    save_student(student, tok, out, read_quantization_config(ckpt), overwrite=True)
    loaded, _ = load_model(str(out))
    ppl = perplexity(loaded, windows)["perplexity"]
    rep = {k: v for k, v in rep.items() if k not in ("losses",)}
    print(f"asvd {args.ratio:.0%} + KD {args.distill_steps} steps: {ppl:.3f} (was {ppl_before:.3f}; "
          f"{rep['seconds'] / 60:.1f} min)", flush=True)
    row = {"model": f"asvd {args.ratio:.0%} + KD {args.distill_steps} steps", "perplexity": ppl,
           "param_ratio": summary["ratio"], "model_params": summary["model_params_after"], "seconds": rep["seconds"]}
    return {"row": row, "report": rep, "ppl_before": ppl_before, "ppl_after": ppl}


if __name__ == "__main__":
    main()
