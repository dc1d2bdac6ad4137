"""quantkit.runtime.native_decode: LeanLM's single-token step as one native call per token, against
the lean forward's torch ops on the same modules (its reference), and where it declines to run."""

import pytest
import torch

from quantkit import api
from quantkit.kernels.native import build
from quantkit.runtime.lean import LeanLM
from quantkit.models.moe import unfuse_experts
from quantkit.runtime.native_decode import DecodePlan, build_plan
from quantkit.testing import tiny_moe

NEEDS_KERNEL = pytest.mark.skipif(not build.available(), reason=f"native kernels unavailable: {build.library()}")


def _native_and_torch_steps(model, ids, steps: int, max_len: int, tol: float):
    """The prompt, then ``steps`` greedy tokens, through the native step and the lean forward's torch
    ops on the same modules: logits within ``tol`` of their range at every step, the native step ran."""
    native, torch_ops = LeanLM(model, max_len), LeanLM(model, max_len, native=False)
    with torch.inference_mode():
        a, b = native.forward(ids), torch_ops.forward(ids)
        for _ in range(steps):
            tok = b.argmax(-1, keepdim=True)
            a, b = native.forward(tok), torch_ops.forward(tok)
            assert (a - b).abs().max() <= tol * b.abs().max()
    assert native.native_step and torch_ops._plan is None
    return native, torch_ops


@NEEDS_KERNEL
@pytest.mark.parametrize("dtype,rotate", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True),
                                          (torch.bfloat16, True)])
def test_native_decode_step_matches_the_torch_forward(stories, dtype, rotate):
    """The one-call-per-token native step (every linear int4 on quantkit's CPU kernel; with
    ``rotate``, the online Hadamard transform before down_proj in C too) against the lean
    forward's torch ops on the same modules: the reference it is tested against."""
    model, _ = stories
    api.compress(model, "rtn", {"bits": 4, "group_size": -1, "rotate": rotate}, pack=True)
    model = model.to(dtype)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    native, torch_ops = _native_and_torch_steps(model, ids, 12, 40, 1e-3 if dtype == torch.float32 else 0.05)
    for kn, kt in zip(native.k_cache, torch_ops.k_cache):  # and wrote the same cache
        assert (kn - kt).abs().max() <= (1e-4 if dtype == torch.float32 else 0.02) * kt.abs().max()


SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "head_dim": 16}


def _family(name: str, offset: float = 1.0, **extra):
    """A tiny random model of ``name`` with non-trivial norms (``offset + 0.3 N(0, 1)``: Gemma weighs by 1 + w)."""
    import transformers

    torch.manual_seed(0)
    cls = "Gemma3" if name == "Gemma3Text" else name
    model = getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{name}Config")(**{**SMALL, **extra})).eval()
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "norm" in n:
                prm.copy_(offset + 0.3 * torch.randn_like(prm))
    return model


FAMILIES = {  # what each adds to Llama's block in the C step
    "qwen3": lambda: _family("Qwen3"),  # per-head q/k norms
    "mistral-window": lambda: _family("Mistral", sliding_window=6),  # a window shorter than the sequence
    "gemma": lambda: _family("Gemma", offset=0.0),  # (1 + w) norms, scaled embeddings, tanh-GELU
    "gemma2": lambda: _family("Gemma2", offset=0.0, sliding_window=6),  # sandwich norms, soft-caps, alternating windows
    "gemma3": lambda: _family("Gemma3Text", offset=0.0, sliding_window=6,  # q/k norms, a RoPE table per layer type
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "phi3": lambda: _family("Phi3", sliding_window=6, pad_token_id=0),  # fused q|k|v and gate|up
    "qwen3_moe": lambda: tiny_moe("qwen3_moe", experts=8, top_k=3, layers=3),  # experts chosen in C, renormalised
    "mixtral": lambda: tiny_moe("mixtral", experts=4, top_k=2, layers=3),
    "qwen2_moe": lambda: tiny_moe("qwen2_moe", experts=4, top_k=2, layers=3, shared_expert_intermediate_size=48),  # + shared expert
    "qwen2_moe-rotated": lambda: tiny_moe("qwen2_moe", experts=4, top_k=2, layers=3),  # one online transform for all
    "qwen3_moe-dense-block": lambda: tiny_moe("qwen3_moe", experts=4, top_k=2, layers=3, mlp_only_layers=[1]),
    "mixtral-rotated": lambda: tiny_moe("mixtral", experts=4, top_k=2, layers=3),  # each expert's online transform in C
    "qwen3_moe-unnormalised": lambda: tiny_moe("qwen3_moe", experts=8, top_k=2, layers=3, norm_topk_prob=False),
}


@NEEDS_KERNEL
@pytest.mark.parametrize("family", list(FAMILIES))
def test_native_step_runs_every_family_it_plans_as_the_torch_forward(family):
    """Each family's block in C (its experts too) against the lean forward's torch ops on the same
    packed modules, over 14 steps (past the windows of 6); the plan did run."""
    model = FAMILIES[family]()
    unfuse_experts(model)
    api.compress(model, "rtn", {"bits": 4, "group_size": -1, "rotate": family.endswith("rotated")}, pack=True, progress=False)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    native, torch_ops = _native_and_torch_steps(model, ids, 14, 24, 2e-3)
    for kn, kt in zip(native.k_cache, torch_ops.k_cache):
        assert (kn - kt).abs().max() <= 1e-3 * kt.abs().max()


@NEEDS_KERNEL
def test_native_step_declines_routers_it_does_not_reproduce_and_bf16_routing():
    """A hook on a router, or a bf16 model (its router sees a bf16 stream in the torch ops, the
    step's would be float32): the torch ops run."""
    model = tiny_moe("qwen3_moe", experts=4, top_k=2)
    unfuse_experts(model)
    api.compress(model, "rtn", {"bits": 4, "group_size": -1}, pack=True, progress=False)
    assert build_plan(LeanLM(model, 16)) is not None
    assert build_plan(LeanLM(model.to(torch.bfloat16), 16)) is None
    model = model.float()
    handle = model.model.layers[1].mlp.gate.register_forward_hook(lambda m, args, out: out)
    assert build_plan(LeanLM(model, 16)) is None
    handle.remove()
    plan = build_plan(LeanLM(model, 16))
    x = torch.full((plan.dims.d,), float("nan"))
    plan.step(x, 0)  # NaN router probabilities: the first experts, no crash (torch gives NaN too)
    assert x.isnan().all()


def test_native_step_declines_what_it_cannot_run(stories):
    """A float model (no int4 kernel weights) or a batch of two: the torch ops, same results."""
    model, _ = stories
    lm = LeanLM(model, 16)
    with torch.inference_mode():
        lm.forward(torch.tensor([[1, 2, 3]]))
        lm.forward(torch.tensor([[4]]))
    assert lm._plan is False


@NEEDS_KERNEL
def test_plan_shares_each_modules_converted_weight_and_decodes_row_0(stories):
    """The plan points into the weights the modules' own forward uses (converted once), checks
    what it is fed, and in a cache of several sequences decodes row 0 (the serving engine's lone row)."""
    model, _ = stories
    api.compress(model, "rtn", {"bits": 4, "group_size": -1}, pack=True)
    lm = LeanLM(model, 16)
    plan = build_plan(lm)
    assert isinstance(plan, DecodePlan) and len(plan.layers) == len(lm.layers)
    assert plan.layers[1].weights[6] is lm.layers[1].down.kernel_weight is not None
    with pytest.raises(ValueError, match="features"):
        plan.step(torch.zeros(plan.dims.d + 1), 0)
    with pytest.raises(ValueError, match="outside"):  # the C step would write past the cache
        plan.step(torch.zeros(plan.dims.d), plan.dims.max_len)
    lm.reset(batch=2)
    plan = build_plan(lm)
    assert plan.layers[3].k_cache.data_ptr() == lm.k_cache[3][0].data_ptr() and plan.dims.max_len == lm.capacity


@NEEDS_KERNEL
def test_native_step_declines_an_input_transform_it_does_not_know(stories):
    model, _ = stories
    api.compress(model, "rtn", {"bits": 4, "group_size": -1}, pack=True)
    model.model.layers[2].mlp.up_proj.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    assert build_plan(LeanLM(model, 16)) is None


@NEEDS_KERNEL
def test_native_step_declines_an_online_transform_of_another_size(stories):
    from quantkit.core.rotation import OnlineHadamard

    model, _ = stories
    api.compress(model, "rtn", {"bits": 4, "group_size": -1}, pack=True)
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(OnlineHadamard(64))  # not down's 172 inputs
    assert build_plan(LeanLM(model, 16)) is None
