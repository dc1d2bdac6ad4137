"""Where users go next (issue 21): one model quantized by quantkit, then read by transformers --
through compressed-tensors (llm-compressor's format, what vLLM and SGLang load) and through
``from_pretrained`` of the quantkit checkpoint itself -- with the perplexity each gives on the
same windows next to quantkit's own.

    python -m quantkit.eval.engines_table --model SmolLM2-135M-Instruct.Q4_1.gguf [--out eval/RESULTS-engines.md]

Rows: GPTQ W4 g64, SmoothQuant W8A8 (dynamic per-token activations) and SparseGPT 2:4 + W4 g64
(one pass), compressed here, or existing quantkit checkpoints given with ``--checkpoint NAME=PATH``.
compressed-tensors checkpoints are reloaded with transformers' default for them: dense weights on the
CPU and, for W8A8, compressed-tensors' own dynamic per-token int8 fake quantization of each linear's
input (its grid is ``absmax / 127.5`` clamped to [-128, 127], where quantkit and vLLM's int8 kernel
use ``absmax / 127``).  The 2:4 row also checks that every group of 4 reloaded weights keeps 2 zeros
(compressed-tensors 0.20 dropped its sparsity configs, so the zeros travel inside the int4 codes).
Target: within 0.5% of quantkit's perplexity.

    python -m quantkit.eval.engines_table --model SmolLM2.gguf --checkpoint "SparseGPT 2:4 + W4=out/smol-24w4"
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from quantkit import api
from quantkit.checkpoint.compressed import export_compressed_tensors
from quantkit.eval.perplexity import perplexity
from quantkit.eval.protocol import add_protocol_args, load_protocol, write_results

ROWS = {"GPTQ W4": ("gptq", {"bits": 4}), "SmoothQuant W8A8": ("smoothquant", {"alpha": 0.5}),
        "SparseGPT 2:4 + W4": ("sparsegpt", {"pattern": "2:4", "bits": 4})}


def _hf(path: Path):
    import quantkit  # noqa: F401  (registers the quantkit quantizer with transformers)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def two_of_four(model) -> bool:
    """Whether every group of 4 consecutive input weights of every linear in the blocks holds 2 zeros."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            w = mod.weight.detach().float()
            if w.shape[1] % 4 or not bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()):
                return False
    return True


def row(name: str, setup, work: Path, group_size: int, checkpoint: str | None = None) -> dict:
    t0 = time.perf_counter()
    if checkpoint is None:
        method, opts = ROWS[name]
        opts = {**opts, "group_size": group_size} if "bits" in opts and opts["bits"] == 4 else opts
        model = copy.deepcopy(setup.model)
        res = api.compress(model, method, opts, calib_ids=setup.calib, progress=False)
        ckpt = api.save(model, setup.tokenizer, work / method, method, res)
    else:
        ckpt = Path(checkpoint)
    seconds = time.perf_counter() - t0
    ours, _ = api.load_model(str(ckpt))
    ppl = {"quantkit": perplexity(ours, setup.windows)["perplexity"]}
    ppl["transformers from_pretrained (quantkit checkpoint)"] = perplexity(_hf(ckpt), setup.windows)["perplexity"]
    export_compressed_tensors(ckpt, work / f"{ckpt.name}-ct")
    theirs = _hf(work / f"{ckpt.name}-ct")
    ppl["transformers, compressed-tensors export"] = perplexity(theirs, setup.windows)["perplexity"]
    base = ppl["quantkit"]
    out = {"name": name, "checkpoint": str(ckpt), "perplexity": ppl, "relative": {k: v / base - 1 for k, v in ppl.items()},
           "within_0.5%": all(abs(v / base - 1) <= 0.005 for v in ppl.values()), "compress_seconds": seconds}
    if "2:4" in name:
        out["2:4 zeros kept by the reload"] = two_of_four(theirs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(ap)
    ap.add_argument("--rows", default=",".join(ROWS), help="Comma-separated rows.")
    ap.add_argument("--group-size", type=int, default=64, help="The 4-bit rows' group size (-1: per channel).")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                    help="Measure this existing quantkit checkpoint as row NAME (repeatable) instead of --rows.")
    ap.add_argument("--out", default="eval/RESULTS-engines.md")
    ap.add_argument("--json-out", default="eval/RESULTS-engines.json")
    args = ap.parse_args(argv)
    setup = load_protocol(args)
    t0 = time.perf_counter()
    given = dict(c.split("=", 1) for c in args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        rows = ([row(name, setup, Path(tmp), args.group_size, path) for name, path in given.items()] if given else
                [row(name, setup, Path(tmp), args.group_size) for name in args.rows.split(",")])
    lines = [f"{Path(args.model).name}; calibration {args.calib} {args.nsamples} x {args.calib_seqlen}; "
             f"{args.dataset} {setup.windows.shape[0]} x {args.seqlen}; {torch.get_num_threads()} threads; "
             f"{time.perf_counter() - t0:.0f} s.", "",
             "| checkpoint | read by | perplexity | vs quantkit |", "|---|---|---|---|"]
    for r in rows:
        for reader, v in r["perplexity"].items():
            lines.append(f"| {r['name']}{' g' + str(args.group_size) if 'W4' in r['name'] and not given else ''} | {reader} | "
                         f"{v:.4f} | {100 * r['relative'][reader]:+.3f}% |")
    lines += [f"\n{r['name']}: every group of 4 reloaded weights holds 2 zeros: {r['2:4 zeros kept by the reload']}"
              for r in rows if "2:4 zeros kept by the reload" in r]
    text = "\n".join(lines) + "\n"
    write_results(args, "quantkit checkpoints read by other engines (issue 21)", text, {"rows": rows})
    return 0 if all(r["within_0.5%"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
