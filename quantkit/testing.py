"""Toy layers and tiny random models for tests (quantkit's and yours), written once.

Every builder is seeded and offline.  The toy layers plant what makes calibration matter in
real LLMs: a few input channels with much larger activations (outliers) and correlated inputs.

    >>> w, x = outlier_layer(seed=0)
    >>> output_error(x, w, w) == 0.0
    True
"""

from __future__ import annotations

import torch
from torch import nn


def outlier_inputs(seed: int = 0, tokens: int = 1024, in_f: int = 128, n_outliers: int = 6, scale: float = 25.0,
                   correlated: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[tokens, in_f]`` Gaussian inputs whose first ``n_outliers`` channels are ``scale`` times
    larger; ``correlated`` mixes the channels (as LLM activations are)."""
    g = generator or torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g)
    x[:, :n_outliers] *= scale
    if correlated:
        x = x @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=g) / in_f**0.5)
    return x


def outlier_layer(seed: int = 0, out_f: int = 32, in_f: int = 128, tokens: int = 1024, correlated: bool = True,
                  **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w [out_f, in_f], x [tokens, in_f])``: a random layer fed :func:`outlier_inputs`."""
    g = torch.Generator().manual_seed(seed)
    x = outlier_inputs(tokens=tokens, in_f=in_f, correlated=correlated, generator=g, **kw)
    w = torch.randn(out_f, in_f, generator=g)
    return w, x


def anisotropic_layer(seed: int = 0, out_f: int = 48, in_f: int = 96, tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, x)`` with inputs living mostly in a few rotated directions (variances spanning six
    orders of magnitude) plus one outlier channel: where activation-aware low-rank wins."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, in_f)
    rot = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))[0]
    x = (torch.randn(tokens, in_f, generator=g) * scales) @ rot  # [tokens, in]
    x[:, 7] += 20 * torch.randn(tokens, generator=g)
    w = torch.randn(out_f, in_f, generator=g)
    return w, x


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Mean squared error of the layer's outputs, ``||x (w - w_hat)^T||^2 / n``: the loss every
    calibrated method minimises."""
    return float(((x @ (w - w_hat).T) ** 2).mean())


def tiny_opt(seed: int = 0) -> nn.Module:
    """A random OPT (LayerNorm with bias, biased linears, ReLU MLP) with non-trivial norms, so
    scale folding into norms and biases is exercised."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True)
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def tiny_llama(seed: int = 0, *, tied: bool = False, dtype: torch.dtype = torch.float32, hidden: int = 64,
               layers: int = 2, intermediate: int = 128, vocab: int = 128, heads: int = 4, kv_heads: int = 2) -> nn.Module:
    """A random Llama with GQA (every width a multiple of 32, so every group size up to 32 fits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).to(dtype).eval()


# the CLI in a process that SIGKILLs itself right after block {last} of a streamed run is written:
# fault injection by patching the hook, in a test or a benchmark, never behind a switch in the product
_KILLED_AFTER_BLOCK = """
import os, signal
from quantkit.checkpoint import streamed
from quantkit.cli import main
done = streamed.StreamHooks.block_done
def block_done(self, index, *rest):
    done(self, index, *rest)
    if index >= {last}:
        os.kill(os.getpid(), signal.SIGKILL)
streamed.StreamHooks.block_done = block_done
main()
"""


def cli_killed_after_block(last: int) -> list[str]:
    """``python`` arguments running ``quantkit`` (append the CLI's own) in a process killed with
    SIGKILL once block ``last`` of a ``--stream`` run is written."""
    return ["-c", _KILLED_AFTER_BLOCK.format(last=last)]


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")


def tiny_moe(family: str, seed: int = 0, *, experts: int = 4, top_k: int = 2, layers: int = 2, **extra) -> nn.Module:
    """A random mixture-of-experts model of ``family`` (one of :data:`MOE_FAMILIES`) in transformers'
    own classes (fused experts), hidden 64, every block an MoE block; non-trivial norms and biases."""
    import transformers

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=256)
    configs = {
        "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=experts)),
        "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=32, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                             num_experts=experts)),
        "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=32, moe_intermediate_size=32, num_experts=experts, norm_topk_prob=True)),
        "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=experts)),
        "gpt_oss": ("GptOssConfig", dict(intermediate_size=32, num_local_experts=experts, layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2))),
        "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, head_dim=8, intermediate_size=64, moe_intermediate_size=32,
                                                 n_routed_experts=experts, n_group=1, topk_group=1, first_k_dense_replace=0,
                                                 q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                 v_head_dim=16)),
    }
    name, own = configs[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, name)(**{**common, **own, "num_experts_per_tok": top_k, **extra})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and "weight" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "bias" in n:
                p.normal_(0, 0.05)
    return model
