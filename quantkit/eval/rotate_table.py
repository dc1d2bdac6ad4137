"""Rotation (QuaRot-style randomized Hadamard, :mod:`quantkit.core.rotation`) before RTN and GPTQ,
at 4 and 3 bits, on a real model, one run, side by side.

    python -m quantkit.eval.rotate_table --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib c4 --nsamples 64 --calib-seqlen 512 --dataset wikitext2 --seqlen 512 --max-windows 16 --speed

Rows: fp32; the rotated float model (the same function: its perplexity must match); RTN with and
without rotation; GPTQ with rotation, and at 4 bits the same weights with per-token int8 and int4
activations (integer matmuls, counted) and an int4 KV cache rotated per head (``--baseline`` adds GPTQ without, the slowest rows; the
README's GPTQ table has them on the same protocol).  The rotated GPTQ 4-bit checkpoint is saved
and reloaded by the runtime (its online Hadamard transforms re-attached from the config) and
evaluated again.  ``--speed`` benchmarks decode of the rotated and unrotated RTN checkpoints
side by side on the same kernels (interleaved rounds, :func:`quantkit.eval.speed.run_benches`).
Writes a markdown table to ``--out`` (default ``eval/RESULTS-rotate.md``: run from the repository root).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import torch

from quantkit import api
from quantkit.checkpoint.formats import load_model
from quantkit.eval.perplexity import perplexity
from quantkit.eval.protocol import add_protocol_args, load_protocol, write_results
from quantkit.runtime.actquant import COUNTS, reset_counts
from quantkit.runtime.kvcache import KVCachedLM, kv_config
from quantkit.runtime.swap import pack_model


ACT_ROWS = {"8": (8, False), "4": (4, False), "4kv": (4, True)}  # --act-rows: (activation bits, int4 KV cache)


def _act_rows(text: str) -> list[tuple[int, bool]]:
    rows = [r.strip() for r in text.split(",")]
    bad = [r for r in rows if r not in ACT_ROWS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown row(s) {bad}: choose from {', '.join(ACT_ROWS)}")
    return [ACT_ROWS[r] for r in rows]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(ap)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--bits", default="4,3", help="Comma-separated weight bit widths.")
    ap.add_argument("--rotate-seed", type=int, default=0)
    ap.add_argument("--observer", default="minmax", choices=("minmax", "mse"), help="Every row's grid observer.")
    ap.add_argument("--asym", action="store_true", help="Asymmetric grids (default: symmetric).")
    ap.add_argument("--no-online-hadamard", action="store_true", help="Rotate the residual stream only.")
    ap.add_argument("--baseline", action="store_true", help="Also GPTQ without rotation (slow).")
    ap.add_argument("--no-activations", action="store_true", help="Skip the W4A8, W4A4 and W4A4 KV4 rows.")
    ap.add_argument("--act-rows", type=_act_rows, default="8,4,4kv",
                    help="Which activation rows, comma-separated: 8 (W4A8), 4 (W4A4), 4kv (W4A4 KV4).")
    ap.add_argument("--act-parts", action="store_true",
                    help="Also 4-bit activations on one kind of linear at a time (what each costs).")
    ap.add_argument("--act-clip", type=float, default=1.0,
                    help="The 4-bit activation rows' clip ratio (each token's grid spans this fraction of its max).")
    ap.add_argument("--act-group-size", type=int, default=-1,
                    help="The 4-bit activation rows' columns per scale (-1: one scale per token).")
    ap.add_argument("--act-asym", action="store_true", help="The 4-bit activation rows' grids with a zero point.")
    ap.add_argument("--speed", action="store_true", help="Decode speed, rotated vs unrotated RTN W4 (needs a quiet machine).")
    ap.add_argument("--speed-only", action="store_true", help="Only the decode-speed comparison (no perplexity rows).")
    ap.add_argument("--out", default="eval/RESULTS-rotate.md")
    ap.add_argument("--json", dest="json_out", default=None, help="Also write the results as JSON here.")
    return ap


def _options(args, bits: int, rotate: bool) -> dict:
    return {"bits": bits, "group_size": args.group_size, "rotate": rotate, "rotate_seed": args.rotate_seed,
            "online_hadamard": not args.no_online_hadamard, "observer": args.observer, "sym": not args.asym}


def _row(args, base, method: str, bits: int | None, rotate: bool, calib, windows) -> tuple:
    """A copy of ``base`` compressed (``method`` "rotate": the rotation alone): ``(model, result, row)``."""
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    if method == "rotate":
        res = api.compress(model, "rotate", {"rotate_seed": args.rotate_seed, "online_hadamard": not args.no_online_hadamard})
        name = "fp32, rotated"
    else:
        res = api.compress(model, method, _options(args, bits, rotate), calib_ids=calib)
        name = f"{method.upper()} W{bits} g{args.group_size}" + (" + rotation" if rotate else "")
    secs = time.perf_counter() - t0
    ppl = perplexity(model, windows)["perplexity"]
    print(f"{name}: {ppl:.3f} ({secs:.1f}s)", flush=True)
    return model, res, {"model": name, "perplexity": ppl, "seconds": round(secs, 1)}


def _reloaded(model, tok, method: str, res, windows, tmp: Path) -> tuple:
    """Save ``model`` and load it back with the runtime: ``(loaded model, its perplexity)``."""
    api.save(model, tok, tmp, method, res)
    loaded, _ = load_model(str(tmp))
    return loaded, perplexity(loaded, windows)["perplexity"]


def _act_row(args, model, res, windows, act_bits: int, kv: bool, only: str | None = None) -> dict:
    """One activation row: the rotated GPTQ W4 weights packed again with ``act_bits`` activations
    (on every linear, or only on those whose name ends with ``only``), with an int4 KV cache if ``kv``."""
    a4 = act_bits == 4
    grid = {"act_clip": args.act_clip if a4 else 1.0, "act_group_size": args.act_group_size if a4 else -1,
            "act_sym": not (a4 and args.act_asym)}
    clip = grid["act_clip"]
    m = copy.deepcopy(model)
    pack_model(m, {n: dataclasses.replace(q, act_bits=act_bits if only is None or n.endswith(only) else None, **grid)
                   for n, q in res.quantized.items()})
    reset_counts()
    lm = KVCachedLM(m, kv_config(4, None, m)) if kv else m
    ppl = perplexity(lm, windows)["perplexity"]
    name = (f"GPTQ W4A{act_bits}{' KV4' if kv else ''} g{args.group_size} + rotation"
            + (f", activations clipped at {clip:g}" if clip != 1.0 else "")
            + (f", a scale per {grid['act_group_size']} columns" if grid["act_group_size"] != -1 else "")
            + (", asymmetric" if not grid["act_sym"] else "") + (f", A{act_bits} on {only} only" if only else ""))
    print(f"{name}: {ppl:.3f} ({COUNTS['int_matmuls']} integer matmuls, {COUNTS['int_macs']:.2e} multiply-adds)", flush=True)
    return {"model": name, "perplexity": ppl, "seconds": None, "int_matmuls": COUNTS["int_matmuls"],
            "int_macs": COUNTS["int_macs"]}


def _activation_rows(args, model, res, windows) -> list[dict]:
    """The rotated GPTQ W4 weights again with activations quantized per token (8, then 4 bits),
    then with an int4 KV cache (rotated per head): what each part costs (``--act-parts``: also 4-bit
    activations on one kind of linear at a time).  Reuses the weights (the activation bits change
    only the runtime modules) and counts the integer matmuls that ran."""
    rows = [_act_row(args, model, res, windows, act_bits, kv) for act_bits, kv in args.act_rows]
    if args.act_parts:
        kinds = dict.fromkeys(n.rsplit(".", 1)[-1] for n in res.quantized)  # q_proj, k_proj, ... in model order
        rows += [_act_row(args, model, res, windows, 4, False, only=k) for k in kinds]
    return rows


def _quality_rows(args, base, tok, calib, windows, tmp: Path) -> tuple[list[dict], dict | None]:
    """The perplexity rows (see the module docstring) and the reload check of the rotated GPTQ W4 checkpoint."""
    rows = [{"model": "fp32", "perplexity": perplexity(base, windows)["perplexity"], "seconds": None}]
    print(f"fp32: {rows[0]['perplexity']:.3f}", flush=True)
    rows.append(_row(args, base, "rotate", None, True, calib, windows)[2])
    check = None
    for bits in [int(b) for b in args.bits.split(",")]:
        for method, rotate in [("rtn", False), ("rtn", True)] + [("gptq", False)] * args.baseline + [("gptq", True)]:
            model, res, row = _row(args, base, method, bits, rotate, calib, windows)
            rows.append(row)
            if method == "gptq" and rotate and bits == 4:
                _, packed = _reloaded(copy.deepcopy(model), tok, method, res, windows, tmp / "gptq4")
                check = {"in_memory": row["perplexity"], "packed": packed}
                print(f"  reloaded: {packed:.4f}", flush=True)
                if not args.no_activations:
                    rows += _activation_rows(args, model, res, windows)
            del model
    return rows, check


def _speed(args, base, tok, tmp: Path) -> dict:
    """Decode tokens/s of RTN W4 with and without rotation, packed and reloaded, side by side."""
    from quantkit.eval.speed import run_benches

    models = {}
    for rotate in (False, True):
        model = copy.deepcopy(base)
        res = api.compress(model, "rtn", {**_options(args, 4, rotate), "observer": "minmax"})  # the format is what counts
        name = "rotated" if rotate else "plain"
        api.save(model, tok, tmp / name, "rtn", res)
        # bf16 activations: PyTorch's low-bit CPU ops (and the native step) are fast with them, slow with fp32
        models[name] = load_model(str(tmp / name), dtype="bfloat16")[0]
    out = run_benches(models, prompt_len=64, gen_len=64, repeat=5)
    res = {n: {"decode_tokens_per_s": r["decode_tokens_per_s"], "forward": r["forward"]} for n, r in out.items()}
    res["ratio"] = res["rotated"]["decode_tokens_per_s"] / res["plain"]["decode_tokens_per_s"]
    print(f"decode tokens/s: plain {res['plain']['decode_tokens_per_s']:.1f} ({res['plain']['forward']}), "
          f"rotated {res['rotated']['decode_tokens_per_s']:.1f} ({res['rotated']['forward']}): {res['ratio']:.3f}x", flush=True)
    return res


def _markdown(args, rows: list[dict], check: dict | None, speed: dict | None, minutes: float) -> str:
    grid = f"{'asymmetric' if args.asym else 'symmetric'} g{args.group_size}, {args.observer} grids"
    lines = [f"| {Path(args.model).name}, {grid} | WikiText-2 ppl ({args.max_windows} x "
             f"{args.seqlen} tokens) | compress s |", "|---|---|---|"] if rows else []
    lines += [f"| {r['model']} | {r['perplexity']:.2f} | {'' if r['seconds'] is None else r['seconds']} |" for r in rows]
    counted = [r for r in rows if r.get("int_matmuls")]
    if counted:
        lines.append("\nInteger matmuls counted while evaluating (int8 x int8 -> int32 on `torch._int_mm`, one per weight "
                     "group): " + "; ".join(f"{r['model']}: {r['int_matmuls']} ({r['int_macs']:.2e} multiply-adds)"
                                           for r in counted) + ".")
    if check:
        lines.append(f"\nRotated GPTQ W4 checkpoint saved and reloaded by the runtime: {check['packed']:.4f} vs "
                     f"{check['in_memory']:.4f} in memory.")
    if speed:
        lines.append(f"\nDecode (RTN W4 g{args.group_size}, 64 + 64 tokens, interleaved): unrotated "
                     f"{speed['plain']['decode_tokens_per_s']:.1f} tokens/s ({speed['plain']['forward']}), rotated "
                     f"{speed['rotated']['decode_tokens_per_s']:.1f} ({speed['rotated']['forward']}): "
                     f"**{speed['ratio']:.3f}x**.")
    lines.append(f"\nCalibration: {args.calib}, {args.nsamples} x {args.calib_seqlen} tokens; rotation seed "
                 f"{args.rotate_seed}{', no online Hadamard' if args.no_online_hadamard else ''}. "
                 f"{minutes:.1f} min on {platform.machine()}, {torch.get_num_threads()} threads.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    setup = load_protocol(args)
    base, tok, windows, calib = setup.model, setup.tokenizer, setup.windows, setup.calib
    t_start = time.perf_counter()
    rows, check, speed = [], None, None
    with tempfile.TemporaryDirectory() as d:
        if not args.speed_only:
            rows, check = _quality_rows(args, base, tok, calib, windows, Path(d))
        if args.speed or args.speed_only:
            speed = _speed(args, base, tok, Path(d))
    text = _markdown(args, rows, check, speed, (time.perf_counter() - t_start) / 60)
    out = {"rows": rows, "packed_check": check, "speed": speed, "args": vars(args)}
    write_results(args, "Rotation before weight quantization (issue 17)", text, out)
    return out


if __name__ == "__main__":
    main()
