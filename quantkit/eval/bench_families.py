"""Decode speed of quantkit's lean forward against transformers' forward, family by family (issue 19).

Packed (``--packed``), every block of the families the native decode step covers runs as one C call
per token (``kernels/decode_step.c``; the table's "native step" column says where it ran); the
baseline is transformers' forward over the same packed modules, so both use the same int4 kernel.

Each family gets a random model of the same "tiny but not trivial" shape (no download): hidden
``--hidden``, ``--layers`` blocks, 4 query heads per key/value head of 64 dimensions, a 32k
vocabulary, and for the families with sliding windows a window shorter than the sequence (so the
windowed paths run). Both forwards decode the same greedy tokens from the same prompt with a
static cache (``quantkit.eval.speed.time_generation``), float or RTN W4 g64 packed
(``--packed``), in ``--dtype``, rounds interleaved so load hits both alike. Target: the lean forward decodes at
least 2x transformers' tokens/s on Gemma 3 and Qwen3-MoE (32 experts, 4 per token; transformers' baseline
runs its own fused experts, quantkit its per-expert linears, :mod:`quantkit.models.moe`).

    python -m quantkit.eval.bench_families [--families gemma3,gemma2,llama] [--packed] [--out eval/RESULTS-families.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

TARGET = 2.0
TARGETED = ("gemma3", "qwen3_moe")  # the families issue 19's target names
MOE_EXPERTS, MOE_TOP_K = 32, 4


def build(family: str, hidden: int, layers: int, window: int, seed: int = 0) -> torch.nn.Module:
    """A random model of ``family`` in transformers' own classes (eval mode, float32)."""
    import transformers

    heads = hidden // 64
    common = dict(vocab_size=32000, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64,
                  max_position_embeddings=4096)
    kinds = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {}),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"sliding_window": window, "pad_token_id": 0}),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, {"sliding_window": window}),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                   {"sliding_window": window, "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6)
                    + ["sliding_attention"] * (layers % 6)}),
        # mixture of experts, shaped as Qwen3-30B-A3B scaled down: 32 experts of width hidden/2, 4 per token
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                      {"num_experts": MOE_EXPERTS, "num_experts_per_tok": MOE_TOP_K, "moe_intermediate_size": hidden // 2,
                       "norm_topk_prob": True}),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                    {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": hidden}),
    }
    config_cls, model_cls, extra = kinds[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**common, **extra})).eval()


def bench(family: str, args) -> dict:
    from quantkit import api
    from quantkit.eval.speed import time_generation
    from quantkit.models.moe import unfuse_experts
    from quantkit.runtime.lean import LeanLM

    model = build(family, args.hidden, args.layers, args.window)
    # transformers' own model (MoE: its fused experts) is the baseline; quantkit's copy has per-expert linears
    stock = copy.deepcopy(model).to(getattr(torch, args.dtype)) if not args.packed else None
    if args.packed:
        api.compress(model, "rtn", {"bits": 4, "group_size": 64}, pack=True, progress=False)
    unfuse_experts(model)
    model = model.to(getattr(torch, args.dtype))
    n = args.prompt_len + args.gen_len + 1
    lean = LeanLM(model, n)
    g = torch.Generator().manual_seed(0)
    times = {"transformers": [], "lean": []}
    for r in range(args.repeat + 1):  # round 0 warms up
        ids = torch.randint(0, 32000, (1, args.prompt_len), generator=g)
        for name in times:
            t = time_generation(model if name == "lean" or stock is None else stock, ids, args.gen_len,
                                lean=lean if name == "lean" else None)
            if r:
                times[name].append(args.gen_len / t[1])
    tps = {k: max(v) for k, v in times.items()}  # best round: the least disturbed by other load
    return {"family": family, "decode_tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
            "speedup": round(tps["lean"] / tps["transformers"], 2), "native_step": lean.native_step,
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="gemma3,gemma2,gemma,phi3,qwen3,llama")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--window", type=int, default=64, help="Sliding window of the windowed families.")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--packed", action="store_true", help="RTN W4 g64, packed for quantkit's int4 kernels.")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="Activations and float weights (bf16 matmuls are slow on CPUs without AVX512-BF16).")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="Write the markdown table here.")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = [bench(f, args) for f in args.families.split(",")]
    from quantkit.kernels.native.build import isa

    lines = [f"Random models: hidden {args.hidden}, {args.layers} layers, head_dim 64, GQA 4:1, vocab 32000, window "
             f"{args.window}; {'RTN W4 g64 packed' if args.packed else 'float'} weights, {args.dtype}; prompt {args.prompt_len}, "
             f"{args.gen_len} decoded tokens, best of {args.repeat} interleaved rounds; {torch.get_num_threads()} threads; native kernels: {isa() or 'unavailable'}; "
             f"{time.perf_counter() - t0:.0f} s.", "",
             "| family | parameters | transformers tok/s | lean tok/s | speedup | native step |", "|---|---|---|---|---|---|"]
    for r in rows:
        d = r["decode_tokens_per_s"]
        lines.append(f"| {r['family']} | {r['parameters'] / 1e6:.1f}M | {d['transformers']} | {d['lean']} | "
                     f"**{r['speedup']}x** | {'yes' if r['native_step'] else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text("# Lean forward vs transformers' forward by family (issue 19)\n\n" + text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "target": TARGET}, indent=2))
    targeted = [r for r in rows if r["family"] in TARGETED]
    return 0 if all(r["speedup"] >= TARGET for r in targeted) else 1


if __name__ == "__main__":
    raise SystemExit(main())
