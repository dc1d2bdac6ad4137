"""Decode speed side by side with llama.cpp on the same GGUF file, in one run.

    python -m quantkit.eval.bench_llamacpp --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--threads 2] [--json F]

llama.cpp (llama-cpp-python) runs the GGUF as it is (Q4_1 for SmolLM2: 4-bit codes, an fp16 scale
and minimum per 32 weights); quantkit runs the same weights dequantized and re-quantized to int4
g64 with the head in int4 too (what `quantkit quantize --quantize-lm-head` writes; for speed the
values do not matter), through its lean forward and native decode step.  Protocol of ANCHORS.md:
batch 1, a 64-token prompt, 32 greedy tokens, tokens/s of the decode part; rounds interleaved
(each round runs both) so load from other processes hits both alike.  Skips cleanly (exit 0, a
note) when llama-cpp-python is not installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch


def llamacpp_decode(llm, prompt: list[int], gen_len: int) -> float:
    """Seconds for ``gen_len`` greedy single-token steps after ``prompt``."""
    from llama_cpp import llama_get_logits

    llm.reset()
    llm.eval(prompt)
    n_vocab = llm.n_vocab()

    def greedy() -> int:
        return int(np.ctypeslib.as_array(llama_get_logits(llm.ctx), shape=(n_vocab,)).argmax())

    tok = greedy()
    t0 = time.perf_counter()
    for _ in range(gen_len):
        llm.eval([tok])
        tok = greedy()
    return time.perf_counter() - t0


def quantkit_decode(lean, prompt: list[int], gen_len: int) -> float:
    lean.reset()
    with torch.inference_mode():
        tok = lean.forward(torch.tensor([prompt])).argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(gen_len):
            tok = lean.forward(tok).argmax(-1, keepdim=True)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed: nothing to compare (pip install llama-cpp-python)")
        return {}
    from quantkit.eval.bench_kernels import int4_model, load_smol
    from quantkit.runtime.lean import LeanLM

    torch.set_num_threads(args.threads)
    llm = Llama(model_path=args.gguf, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=256,
                n_batch=256, verbose=False)
    model = int4_model(load_smol(args.gguf).to(torch.bfloat16), 64, lm_head=True)
    lean = LeanLM(model, args.prompt_len + args.gen_len + 1)
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    llamacpp_decode(llm, prompt, 4), quantkit_decode(lean, prompt, 4)  # warm-up (kernel layouts, llama.cpp buffers)
    times = {"llama.cpp": [], "quantkit": []}
    for _ in range(args.rounds):
        times["llama.cpp"].append(llamacpp_decode(llm, prompt, args.gen_len))
        times["quantkit"].append(quantkit_decode(lean, prompt, args.gen_len))
    tps = {k: [args.gen_len / t for t in v] for k, v in times.items()}
    report = {k: {"decode_tokens_per_s": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                  "best": max(v)} for k, v in tps.items()}
    report["quantkit_vs_llamacpp"] = report["quantkit"]["decode_tokens_per_s"] / report["llama.cpp"]["decode_tokens_per_s"]
    report["native_step"] = lean.native_step
    report["protocol"] = {"threads": args.threads, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "rounds": args.rounds}
    for k in ("llama.cpp", "quantkit"):
        r = report[k]
        print(f"{k:10s} {r['decode_tokens_per_s']:7.1f} ± {r['std']:.1f} tok/s (best {r['best']:.1f})")
    print(f"quantkit / llama.cpp: {report['quantkit_vs_llamacpp']:.2f}x (native step: {lean.native_step})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
