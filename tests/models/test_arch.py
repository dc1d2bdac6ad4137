"""Every family in the architecture table is found and compressed, from tiny random configs."""

import pytest
import torch
from torch import nn

from quantkit import api
from quantkit.models.arch import ARCHITECTURES, arch_for
from quantkit.errors import QuantkitError

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": ("LlamaConfig", COMMON),
    "mistral": ("MistralConfig", COMMON),
    "qwen2": ("Qwen2Config", COMMON),
    "qwen3": ("Qwen3Config", dict(COMMON, head_dim=8)),
    "gemma": ("GemmaConfig", dict(COMMON, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(COMMON, head_dim=8)),
    "gemma3_text": ("Gemma3TextConfig", dict(COMMON, head_dim=8)),
    "phi3": ("Phi3Config", dict(COMMON, pad_token_id=0)),
    "opt": ("OPTConfig", dict(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=64, word_embed_proj_dim=32)),
    "gpt2": ("GPT2Config", dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64)),
}


def tiny_model(family):
    cls_name, kwargs = FAMILIES[family]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_found_and_quantizes(family):
    model = tiny_model(family)
    spec = arch_for(model)
    assert len(spec.blocks(model)) == 2
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    res = api.compress(model, "gptq", dict(bits=8, group_size=-1), calib_ids=ids, batch_size=2)
    n_linears = len(spec.linear_names()) * 2
    assert len(res.quantized) == n_linears
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_unknown_architecture_names_what_is_missing():
    model = nn.Linear(2, 2)
    model.config = type("C", (), {"model_type": "mamba"})()
    with pytest.raises(QuantkitError, match="model_type 'mamba' is not in quantkit's table"):
        arch_for(model)


def test_table_entry_that_does_not_fit_the_model_names_the_module():
    model = tiny_model("llama")
    del model.model.layers[0].mlp.gate_proj
    with pytest.raises(QuantkitError, match="mlp.gate_proj"):
        arch_for(model)


def test_every_entrys_qk_linears_are_its_attention_inputs():
    for spec in ARCHITECTURES:
        assert spec.qk and set(spec.qk) <= set(spec.linear_names()), spec.name
        assert all(g.linears[0] in spec.qk or not set(g.linears) & set(spec.qk) for g in spec.groups), spec.name
