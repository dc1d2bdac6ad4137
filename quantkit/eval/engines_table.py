"""Where users go next (issue 21): one model quantized by quantkit, then read by transformers --
through compressed-tensors (llm-compressor's format, what vLLM and SGLang load) and through
``from_pretrained`` of the quantkit checkpoint itself -- with the perplexity each gives on the
same windows next to quantkit's own.

    python -m quantkit.eval.engines_table --model SmolLM2-135M-Instruct.Q4_1.gguf [--out eval/RESULTS-engines.md]

Rows: GPTQ W4 g64 and SmoothQuant W8A8 (dynamic per-token activations). compressed-tensors
checkpoints are reloaded with ``CompressedTensorsConfig(run_compressed=False)`` (dense weights on
the CPU; vLLM runs the same tensors on its kernels).  That reload drops the input-activation scheme:
a W8A8 row there runs W8A16 (exact weights, float activations), not what vLLM runs.  Target: within
0.5% of quantkit's perplexity.
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

ROWS = {"GPTQ W4": ("gptq", {"bits": 4}), "SmoothQuant W8A8": ("smoothquant", {"alpha": 0.5})}


def _hf(path: Path, compressed: bool):
    import quantkit  # noqa: F401  (registers the quantkit quantizer with transformers)
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if compressed else {}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()


def row(name: str, setup, work: Path, group_size: int) -> dict:
    method, opts = ROWS[name]
    opts = {**opts, "group_size": group_size} if method == "gptq" else opts
    model = copy.deepcopy(setup.model)
    t0 = time.perf_counter()
    res = api.compress(model, method, opts, calib_ids=setup.calib, progress=False)
    ckpt = api.save(model, setup.tokenizer, work / method, method, res)
    seconds = time.perf_counter() - t0
    ours, _ = api.load_model(str(ckpt))
    ppl = {"quantkit": perplexity(ours, setup.windows)["perplexity"]}
    ppl["transformers from_pretrained (quantkit checkpoint)"] = perplexity(_hf(ckpt, False), setup.windows)["perplexity"]
    export_compressed_tensors(ckpt, work / f"{method}-ct")
    ppl["transformers, compressed-tensors export"] = perplexity(_hf(work / f"{method}-ct", True), setup.windows)["perplexity"]
    base = ppl["quantkit"]
    return {"name": name, "perplexity": ppl, "relative": {k: v / base - 1 for k, v in ppl.items()},
            "within_0.5%": all(abs(v / base - 1) <= 0.005 for v in ppl.values()), "compress_seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(ap)
    ap.add_argument("--rows", default=",".join(ROWS), help="Comma-separated rows.")
    ap.add_argument("--group-size", type=int, default=64, help="GPTQ's group size (-1: per channel).")
    ap.add_argument("--out", default="eval/RESULTS-engines.md")
    ap.add_argument("--json-out", default="eval/RESULTS-engines.json")
    args = ap.parse_args(argv)
    setup = load_protocol(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row(name, setup, Path(tmp), args.group_size) for name in args.rows.split(",")]
    lines = [f"{Path(args.model).name}; calibration {args.calib} {args.nsamples} x {args.calib_seqlen}; "
             f"{args.dataset} {setup.windows.shape[0]} x {args.seqlen}; {torch.get_num_threads()} threads; "
             f"{time.perf_counter() - t0:.0f} s.", "",
             "| checkpoint | read by | perplexity | vs quantkit |", "|---|---|---|---|"]
    for r in rows:
        for reader, v in r["perplexity"].items():
            lines.append(f"| {r['name']}{' g' + str(args.group_size) if 'GPTQ' in r['name'] else ''} | {reader} | {v:.4f} | {100 * r['relative'][reader]:+.3f}% |")
    text = "\n".join(lines) + "\n"
    write_results(args, "quantkit checkpoints read by other engines (issue 21)", text, {"rows": rows})
    return 0 if all(r["within_0.5%"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
