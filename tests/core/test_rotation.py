"""The residual-stream rotation computes the original function on every family the architecture
table rotates, and refuses the others up front."""

from __future__ import annotations

import pytest
import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, GraniteConfig, GraniteForCausalLM,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from quantkit.core.rotation import OnlineHadamard, attach_online, online_transforms, rotate_model
from quantkit.errors import QuantkitError
from quantkit.models.arch import arch_for, get_module, set_module
from quantkit.models.moe import unfuse_experts
from quantkit.testing import tiny_moe

SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "llama-dct": (LlamaConfig, LlamaForCausalLM, {"hidden_size": 24, "intermediate_size": 40, "head_dim": 6}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),  # per-head q/k norms
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 8}),  # RMSNorm scales (1 + w), scaled embeddings
    "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": 0}),  # fused qkv and gate_up
    "granite": (GraniteConfig, GraniteForCausalLM, {"residual_multiplier": 0.5, "embedding_multiplier": 2.0,
                                                   "logits_scaling": 3.0}),
}


def tiny(family: str, seed: int = 0):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**SIZES, **extra})).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that folding them is tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("family,experts", [("mixtral", 4), ("qwen3_moe", 4), ("olmoe", 4), ("qwen2_moe", 4)])
def test_a_rotated_mixture_of_experts_computes_the_same_function(family, experts):
    """The norm before the experts folds into the router and every expert's gate/up (so the router
    picks the same experts), each expert's down writes Q^T W and gets its online transform; a
    Qwen3-MoE dense block (mlp_only_layers) rotates as a dense MLP beside the MoE blocks."""
    extra = {"mlp_only_layers": [1]} if family == "qwen3_moe" else {}
    model = tiny_moe(family, experts=experts, top_k=2, **extra)
    unfuse_experts(model)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    record = rotate_model(model, arch_for(model), seed=3)
    after = _logits(model, ids)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4), (after - before).abs().max()
    moe_blocks = 1 if extra else 2
    shared = 1 if family == "qwen2_moe" else 0
    assert len(record["online"]) == moe_blocks * (experts + shared) + (2 - moe_blocks)
    assert all(online_transforms(get_module(model, name)) for name in record["online"])
    router = model.model.layers[0].mlp.gate.weight
    assert router.dtype == torch.float32 and not torch.equal(router, tiny_moe(family, experts=experts, top_k=2).model.layers[0].mlp.gate.weight)


def test_a_clamped_qkv_or_a_router_the_table_does_not_name_is_refused():
    model = tiny_moe("olmoe", experts=4, top_k=2, clip_qkv=0.5)  # OLMoE's clamp: no rotation of the values
    unfuse_experts(model)
    with pytest.raises(QuantkitError, match="clip_qkv"):
        rotate_model(model, arch_for(model))
    model = tiny_moe("qwen3_moe", experts=4, top_k=2)
    unfuse_experts(model)
    arch = arch_for(model)
    model.model.layers[1].mlp.router = model.model.layers[1].mlp.gate  # as if a release renamed it
    del model.model.layers[1].mlp.gate
    with pytest.raises(QuantkitError, match="mlp.gate"):
        rotate_model(model, arch)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rotated_model_computes_the_same_function(family):
    model = tiny(family)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    record = rotate_model(model, arch_for(model), seed=3)
    after = _logits(model, ids)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4), (after - before).abs().max()
    assert len(record["online"]) == 2 and record["hidden_size"] == model.config.hidden_size
    assert not model.config.tie_word_embeddings


def test_rotation_changes_the_weights_and_flattens_an_outlier_channel():
    model = tiny("llama")
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        emb[:, 5] *= 40  # one outlier channel in the residual stream
    ratio = lambda w: (w.abs().max() / w.abs().mean()).item()
    before = ratio(emb)
    rotate_model(model, arch_for(model))
    assert ratio(model.model.embed_tokens.weight) < before / 4
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(32))


def test_without_online_hadamard_no_hook_is_left():
    model = tiny("llama")
    ids = torch.randint(0, 96, (1, 8))
    before = _logits(model, ids)
    record = rotate_model(model, arch_for(model), online=False)
    assert record["online"] == {}
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert torch.allclose(_logits(model, ids), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_cls,cfg,why", [
    (GPT2LMHeadModel, GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=32), "LayerNorm"),
    (Gemma2ForCausalLM, Gemma2Config(**{**SIZES, "head_dim": 8}), "before the residual add"),
])
def test_unrotatable_families_are_refused(model_cls, cfg, why):
    model = model_cls(cfg)
    with pytest.raises(QuantkitError, match=why):
        rotate_model(model, arch_for(model))


def test_a_second_rotation_is_refused():
    model = tiny("llama")
    rotate_model(model, arch_for(model))
    with pytest.raises(QuantkitError, match="rotated already"):
        rotate_model(model, arch_for(model))


def test_swapped_module_keeps_the_online_transform():
    model = tiny("llama")
    rotate_model(model, arch_for(model))
    name = "model.layers.0.mlp.down_proj"
    old = get_module(model, name)
    new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    new.weight.data.copy_(old.weight.data)
    set_module(model, name, new)
    assert len(online_transforms(new)) == 1


def test_attach_online_checks_the_record():
    model = tiny("llama")
    with pytest.raises(QuantkitError, match="does not have"):
        attach_online(model, {"online": {"model.layers.9.mlp.down_proj": 48}})
    with pytest.raises(QuantkitError, match="takes 48 features"):
        attach_online(model, {"online": {"model.layers.0.mlp.down_proj": 47}})
    with pytest.raises(QuantkitError, match="mapping"):
        attach_online(model, {"online": [1]})
    attach_online(model, {"online": {"model.layers.0.mlp.down_proj": 48}})
    attach_online(model, {"online": {"model.layers.0.mlp.down_proj": 48}})  # idempotent
    hooks = model.model.layers[0].mlp.down_proj._forward_pre_hooks.values()
    assert sum(isinstance(h, OnlineHadamard) for h in hooks) == 1


def test_fast_rotation_equals_the_dense_randomized_hadamard():
    from quantkit.core.hadamard import random_hadamard

    model = tiny("llama-dct")  # hidden 24 = 12 x 2: a Paley factor
    emb = model.model.embed_tokens.weight.detach().double().clone()
    rotate_model(model, arch_for(model), seed=5)
    assert torch.allclose(model.model.embed_tokens.weight.double(), emb @ random_hadamard(24, 5), atol=1e-6)
