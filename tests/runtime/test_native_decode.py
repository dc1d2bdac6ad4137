"""quantkit.runtime.native_decode: LeanLM's single-token step as one native call per token, against
the lean forward's torch ops on the same modules (its reference), and where it declines to run."""

import pytest
import torch

from quantkit import api
from quantkit.kernels.native import build
from quantkit.runtime.lean import LeanLM
from quantkit.runtime.native_decode import DecodePlan, build_plan

NEEDS_KERNEL = pytest.mark.skipif(not build.available(), reason=f"native kernels unavailable: {build.library()}")


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
    native, torch_ops = LeanLM(model, 40), LeanLM(model, 40, native=False)
    with torch.inference_mode():
        a, b = native.forward(ids), torch_ops.forward(ids)
        for _ in range(12):
            tok = b.argmax(-1, keepdim=True)
            a, b = native.forward(tok), torch_ops.forward(tok)
            tol = 1e-3 if dtype == torch.float32 else 0.05
            assert (a - b).abs().max() <= tol * b.abs().max()
    assert native._plan is not False and torch_ops._plan is None  # the native step did run
    for kn, kt in zip(native.k_cache, torch_ops.k_cache):  # and wrote the same cache
        assert (kn - kt).abs().max() <= (1e-4 if dtype == torch.float32 else 0.02) * kt.abs().max()


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
