"""Scale folding (quantkit.core.transforms) leaves the float model's function unchanged."""

import pytest
import torch

from quantkit.models.arch import LinearGroup, arch_for
from quantkit.core.transforms import ClipResult, ScaleResult, apply_clip, clip_weight, fold_blocker, fold_scales
from quantkit.testing import tiny_opt


def tiny_gemma(seed=0):
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=8, max_position_embeddings=64)
    model = GemmaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def fold_random_scales(model, seed=1):
    """Fold random positive scales into every foldable group of every block; returns how many."""
    arch = arch_for(model)
    g = torch.Generator().manual_seed(seed)
    n = 0
    for block in arch.blocks(model):
        for group in arch.groups:
            if fold_blocker(block, group, arch.transposed):
                continue
            in_f = block.get_submodule(group.linears[0]).weight.shape[1]
            s = torch.exp(torch.randn(in_f, generator=g) * 0.7)
            fold_scales(block, ScaleResult(group.prev, group.prev_kind, group.linears, s),
                        transposed=arch.transposed, norm_offset=arch.norm_offset)
            n += 1
    return n


@pytest.mark.parametrize("make,expected_groups", [("stories", 3), ("opt", 4), ("gemma", 4)])
def test_folding_random_scales_preserves_outputs(make, expected_groups, stories):
    model = {"stories": lambda: stories[0], "opt": tiny_opt, "gemma": tiny_gemma}[make]()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    n = fold_random_scales(model)
    assert n == expected_groups * len(arch_for(model).blocks(model))
    after = _logits(model, ids)
    assert _rel(after, before) < 1e-5
    # and the weights really changed
    assert not torch.equal(after, before) or n == 0


def test_gqa_value_to_output_is_not_foldable(stories):
    model = stories[0]
    arch = arch_for(model)
    block = arch.blocks(model)[0]
    o_group = next(g for g in arch.groups if g.linears == ("self_attn.o_proj",))
    assert "grouped-query" in fold_blocker(block, o_group)
    assert fold_blocker(block, LinearGroup(("mlp.down_proj",), None, "")) == "no foldable module feeds it"
    assert fold_blocker(block, arch.groups[0]) is None


def test_fold_rejects_bad_scales(stories):
    from quantkit.errors import QuantkitError

    block = arch_for(stories[0]).blocks(stories[0])[0]
    with pytest.raises(QuantkitError, match="finite and positive"):
        fold_scales(block, ScaleResult("input_layernorm", "norm", ("self_attn.q_proj",), -torch.ones(64)))
    with pytest.raises(QuantkitError, match="cannot fold"):
        fold_scales(block, ScaleResult("input_layernorm", "norm", ("self_attn.q_proj",), torch.ones(63)))


def test_clip_weight_bounds_each_group():
    w = torch.randn(4, 16)
    max_val = torch.rand(4, 2) * 0.5
    c = clip_weight(w, max_val, 8)
    assert torch.all(c.reshape(4, 2, 8).abs() <= max_val.unsqueeze(-1) + 1e-7)
    inside = w.reshape(4, 2, 8).abs() <= max_val.unsqueeze(-1)
    assert torch.equal(c.reshape(4, 2, 8)[inside], w.reshape(4, 2, 8)[inside])
    lin = torch.nn.Linear(16, 4)
    ref = clip_weight(lin.weight.data.clone(), max_val, 8)
    apply_clip(torch.nn.ModuleDict({"fc": lin}), ClipResult("fc", max_val, 8))
    assert torch.equal(lin.weight.data, ref)
