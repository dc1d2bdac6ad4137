import json

import pytest
import torch
import torch.nn.functional as F

from quantkit import api
from quantkit.runtime.lowrank import LowRankLinear
from quantkit.runtime.modules import runtime_module_class


def test_lowrank_linear_matches_dense_product():
    g = torch.Generator().manual_seed(0)
    u, v, b = torch.randn(3, 10, generator=g), torch.randn(7, 3, generator=g), torch.randn(7, generator=g)
    mod = LowRankLinear.from_factors(u, v, bias=b)
    x = torch.randn(2, 5, 10, generator=g)
    torch.testing.assert_close(mod(x), F.linear(x, v @ u, b))
    assert mod.weight.shape == (7, 10) and mod.num_params() == 3 * 17 + 7
    assert mod(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert runtime_module_class("lowrank") is LowRankLinear
    empty = LowRankLinear.from_entry(10, 7, {"kind": "lowrank", "rank": 3}, bias=True, dtype=torch.float32)
    assert empty.load_state_dict(mod.state_dict()) is not None and torch.equal(empty(x), mod(x))
    with pytest.raises(ValueError):
        LowRankLinear(10, 7, rank=8)


@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_lowrank_save_load_logits_equal(tmp_path, stories, calib_ids, eval_windows, method):
    from quantkit.eval.perplexity import perplexity
    from quantkit.checkpoint.formats import load_model

    model, tok = stories
    res = api.compress(model, method, {"ratio": 0.7}, calib_ids=calib_ids)
    with torch.no_grad():
        ref = model(input_ids=eval_windows[:2]).logits
    ppl_mem = perplexity(model, eval_windows)["perplexity"]
    api.save(model, tok, tmp_path / "ckpt", method, res)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert cfg["modules"] == {name: {"kind": "lowrank", "rank": r} for name, r in res.extra["lowrank"]["ranks"].items()}
    loaded, _ = load_model(str(tmp_path / "ckpt"))
    assert isinstance(loaded.model.layers[0].mlp.up_proj, LowRankLinear)
    with torch.no_grad():
        out = loaded(input_ids=eval_windows[:2]).logits
    assert torch.equal(out, ref)
    assert perplexity(loaded, eval_windows)["perplexity"] == ppl_mem
