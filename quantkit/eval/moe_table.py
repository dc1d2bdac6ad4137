"""Mixture-of-experts quantization on a real model, offline: a dense Llama (SmolLM2) upcycled into a
Mixtral whose experts are all copies of its MLP, quantized with GPTQ side by side with the dense model.

An upcycled model computes what the dense one computes (the router's top-k weights sum to 1 and
every expert is the same MLP), whatever its random router picks, so its float perplexity is the
dense model's and its GPTQ results measure quantkit's expert calibration alone:

- routed: each expert's statistics come from the tokens the router sends it (about top_k / experts
  of them), experts below ``--expert-min-tokens`` falling back to RTN;
- all experts (``--all-experts``): every expert sees every token, so each is quantized as the
  dense MLP is, and the model should score what dense GPTQ scores.

    python -m quantkit.eval.moe_table --model SmolLM2-135M-Instruct.Q4_1.gguf [--experts 8 --top-k 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from quantkit import api
from quantkit.eval.perplexity import perplexity
from quantkit.eval.protocol import add_protocol_args, load_protocol, write_results


def upcycle(dense: nn.Module, experts: int = 8, top_k: int = 2, seed: int = 0) -> nn.Module:
    """A Mixtral with ``dense``'s (a Llama's) attention, norms and embeddings, and ``experts`` copies
    of its MLP behind a random router (``top_k`` per token): the same function, as transformers' own model."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = dense.config
    rope = getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    moe_cfg = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
        tie_word_embeddings=False, num_local_experts=experts, num_experts_per_tok=top_k, router_jitter_noise=0.0,
        sliding_window=None, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    moe = AutoModelForCausalLM.from_config(moe_cfg).to(dense.dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        own = dict(moe.named_parameters())
        for name, p in dense.named_parameters():
            if ".mlp." not in name and name in own:
                own[name].copy_(p)
        moe.lm_head.weight.copy_(dense.get_output_embeddings().weight)
        for block, layer in zip(moe.model.layers, dense.model.layers):
            mlp = layer.mlp
            block.mlp.experts.gate_up_proj.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])[None].expand(experts, -1, -1))
            block.mlp.experts.down_proj.copy_(mlp.down_proj.weight[None].expand(experts, -1, -1))
            block.mlp.gate.weight.copy_(torch.randn(block.mlp.gate.weight.shape, generator=g) * 0.5)
    moe.generation_config = copy.deepcopy(dense.generation_config)
    return moe


def _row(name: str, model, windows, seconds: float | None = None) -> dict:
    return {"model": name, "perplexity": round(perplexity(model, windows)["perplexity"], 4),
            "seconds": None if seconds is None else round(seconds, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(ap)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default="eval/RESULTS-moe.md")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    setup = load_protocol(args)
    opts = {"bits": args.bits, "group_size": args.group_size}
    moe = upcycle(setup.model, args.experts, args.top_k)
    rows = [_row("dense float", setup.model, setup.windows), _row(f"upcycled MoE float ({args.experts} experts, top {args.top_k})",
                                                                   moe, setup.windows)]
    for label, model, extra in (("dense GPTQ", setup.model, {}), ("MoE GPTQ, routed tokens", moe, {}),
                                ("MoE GPTQ, --all-experts", moe, {"all_experts": True})):
        model = copy.deepcopy(model)
        t0 = time.perf_counter()
        res = api.compress(model, "gptq", {**opts, **extra}, calib_ids=setup.calib, progress=False)
        row = _row(label, model, setup.windows, time.perf_counter() - t0)
        tokens = [c for per_block in res.extra.get("expert_tokens", {}).values() for c in per_block]
        row["expert_tokens"] = f"{min(tokens)}-{max(tokens)}" if tokens else ""
        row["fell_back"] = len({r.module.rsplit(".", 1)[0] for r in res.log if "calibration token(s)" in r.note})
        rows.append(row)
    lines = [f"Model {args.model}; GPTQ W{args.bits} g{args.group_size}; calibration {args.calib} {args.nsamples} x "
             f"{args.calib_seqlen}; {args.dataset} first {args.max_windows} x {args.seqlen}; {torch.get_num_threads()} threads.",
             "", "| model | perplexity | seconds | calibration tokens per expert | experts on RTN |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['perplexity']} | {r['seconds'] or ''} | {r.get('expert_tokens', '')} | {r.get('fell_back', '')} |"
              for r in rows]
    write_results(args, "Mixture of experts: an upcycled SmolLM2, GPTQ per expert (issue 19)", "\n".join(lines) + "\n",
                  {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
