"""GPTQ-quantized model exported to GGUF and run in llama.cpp: perplexity in llama.cpp vs
quantkit's runtime on the same token windows.

    python -m quantkit.eval.gguf_llamacpp --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --nsamples 64 --calib-seqlen 512 --max-windows 16 --seqlen 512

Quantizes with GPTQ (4-bit, group 32, symmetric, C4 calibration by default), saves the packed
checkpoint, exports it with ``quantkit export --format gguf`` (symmetric 4-bit -> Q4_0) and
evaluates both on identical windows of token ids: quantkit's runtime on the packed checkpoint,
llama.cpp (llama-cpp-python, ``logits_all=True``) on the GGUF file fed the same ids (never
text, so the two tokenizers cannot differ), the mean NLL computed here from llama.cpp's logits
exactly as :func:`quantkit.eval.perplexity.perplexity` does.  Linears whose input width the group size
does not divide (stories260K's 172-wide MLP output) stay float and are written as float.
The goal is a relative difference below 1%.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from quantkit import api
from quantkit.data import calibration_samples, eval_windows, load_text, tokenize
from quantkit.eval.perplexity import perplexity
from quantkit.checkpoint.gguf import export_gguf
from quantkit.checkpoint.formats import load_model
from quantkit.runtime.backends import use_backend


def llamacpp_perplexity(gguf_path: str | Path, windows: torch.Tensor, n_threads: int = 1) -> dict:
    """Perplexity of ``windows [n, seqlen]`` (token ids) under llama.cpp, same protocol and
    output keys as :func:`quantkit.eval.perplexity.perplexity`."""
    from llama_cpp import Llama

    t0 = time.perf_counter()
    n, seqlen = windows.shape
    llm = Llama(model_path=str(gguf_path), n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, logits_all=True,
                n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    nll_sum, nll_sq, count = 0.0, 0.0, 0
    for w in windows:
        llm.reset()  # a fresh KV cache per window
        llm.eval(w.tolist())
        logits = torch.from_numpy(np.asarray(llm.scores[:seqlen], dtype=np.float32))  # [seqlen, vocab]
        nll = F.cross_entropy(logits[:-1], w[1:], reduction="none").double()
        nll_sum += float(nll.sum())
        nll_sq += float(nll.pow(2).sum())
        count += nll.numel()
    llm.close()
    mean = nll_sum / count
    ppl = math.exp(mean)
    return {"perplexity": ppl, "stderr": ppl * math.sqrt(max(nll_sq / count - mean * mean, 0.0) / count), "tokens": count,
            "windows": n, "seqlen": seqlen, "seconds": time.perf_counter() - t0}


def indivisible_linears(model, group_size: int) -> list[str]:
    """Regexes for the linears whose input width ``group_size`` does not divide (kept float)."""
    from quantkit.models.arch import arch_for, get_module

    arch = arch_for(model)
    block = arch.blocks(model)[0]
    return [rf"\.{re.escape(name)}$" for name in arch.linear_names()
            if group_size != -1 and get_module(block, name).in_features % group_size]


def run(model_path: str, *, bits: int = 4, group_size: int = 32, calib: str = "c4", nsamples: int = 64,
        calib_seqlen: int = 512, dataset: str = "wikitext2", split: str = "test", seqlen: int = 512,
        max_windows: int | None = 16, float_type: str = "f16", backend: str = "auto", out: str | None = None,
        n_threads: int = 1, log=print) -> dict:
    model, tok = load_model(model_path)
    windows = eval_windows(tokenize(tok, load_text(dataset, split)), seqlen, max_windows)
    calib_ids = calibration_samples(tok, calib, nsamples, calib_seqlen, seed=0)
    ignore = tuple(indivisible_linears(model, group_size))
    if ignore:
        log(f"kept in float (input width not a multiple of {group_size}): {', '.join(ignore)}")
    t = time.perf_counter()
    res = api.compress(model, "gptq", {"bits": bits, "group_size": group_size, "sym": True, "ignore": ignore}, calib_ids=calib_ids)
    log(f"GPTQ W{bits} g{group_size}: {time.perf_counter() - t:.0f}s")
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "ckpt"
        api.save(model, tok, ckpt, "gptq", res)
        del model
        gguf_path = Path(out) if out else Path(d) / "model.gguf"
        summary = export_gguf(ckpt, gguf_path, float_type=float_type, overwrite=True)
        log(f"GGUF: {gguf_path} ({summary['bytes'] / 1e6:.1f} MB, tensors {summary['tensors']})")
        with use_backend(backend):
            packed, _ = load_model(str(ckpt), with_tokenizer=False)
            ours = perplexity(packed, windows)
        log(f"quantkit runtime ({backend} backend): {ours['perplexity']:.4f} ({ours['seconds']:.0f}s)")
        theirs = llamacpp_perplexity(gguf_path, windows, n_threads)
        log(f"llama.cpp: {theirs['perplexity']:.4f} ({theirs['seconds']:.0f}s)")
    rel = abs(theirs["perplexity"] - ours["perplexity"]) / ours["perplexity"]
    log(f"relative difference {rel:.2e} ({'within' if rel < 0.01 else 'ABOVE'} the 1% goal)")
    return {"quantkit": ours, "llamacpp": theirs, "rel_diff": rel, "gguf": summary, "ignored": list(ignore)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--float-type", choices=["f16", "f32"], default="f16")
    ap.add_argument("--backend", choices=["auto", "reference", "cpu"], default="auto",
                    help="quantkit runtime kernel path (reference: exact fp32 dequantized weights).")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads.")
    ap.add_argument("--out", default=None, help="Keep the GGUF file here.")
    ap.add_argument("--json", dest="json_out", default=None, help="Also write the results as JSON here.")
    args = ap.parse_args(argv)
    result = run(args.model, bits=args.bits, group_size=args.group_size, calib=args.calib, nsamples=args.nsamples,
                 calib_seqlen=args.calib_seqlen, dataset=args.dataset, split=args.split, seqlen=args.seqlen,
                 max_windows=args.max_windows, float_type=args.float_type, backend=args.backend, out=args.out,
                 n_threads=args.threads)
    name = Path(args.model).name
    print(f"\n| {name}, GPTQ W{args.bits} g{args.group_size} sym | perplexity ({result['quantkit']['windows']} x {args.seqlen} tokens) |")
    print("|---|---|")
    print(f"| quantkit runtime ({args.backend}) | {result['quantkit']['perplexity']:.4f} |")
    print(f"| llama.cpp, GGUF | {result['llamacpp']['perplexity']:.4f} |")
    print(f"| relative difference | {result['rel_diff']:.2e} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
