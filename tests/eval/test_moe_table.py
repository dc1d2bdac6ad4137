"""quantkit.eval.moe_table: an upcycled MoE computes the dense model, and with --all-experts GPTQ
quantizes each expert exactly as it quantizes the dense MLP."""

import copy

import torch

from quantkit import api
from quantkit.eval.moe_table import upcycle
from quantkit.models.moe import Experts


def test_upcycled_moe_with_all_experts_is_dense_gptq(stories, calib_ids):
    dense, _ = stories
    moe = upcycle(dense, experts=4, top_k=2)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    opts = {"bits": 4, "group_size": -1}
    everyone, routed = copy.deepcopy(moe), copy.deepcopy(moe)
    api.compress(dense, "gptq", opts, calib_ids=calib_ids, progress=False)
    api.compress(everyone, "gptq", {**opts, "all_experts": True}, calib_ids=calib_ids, progress=False)
    api.compress(routed, "gptq", {**opts, "expert_min_tokens": 0}, calib_ids=calib_ids, progress=False)
    assert isinstance(everyone.model.layers[0].mlp.experts, Experts)
    with torch.no_grad():
        ref, got, other = dense(ids).logits, everyone(ids).logits, routed(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # every expert calibrated as the dense MLP
    assert (other - ref).abs().max() > 1e-2  # routed statistics differ (a test that can fail)
