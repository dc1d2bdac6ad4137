"""The one table from compression result to runtime module: every result type in
quantkit.core.types has a builder, and what it builds survives a checkpoint round trip through the
loader's kind table (same outputs after state_dict -> empty module from the entry -> load)."""

import dataclasses

import pytest
import torch

from quantkit.core import types
from quantkit.core.quant import QuantSpec, quantize_rtn
from quantkit.core.sparsity import nm_mask
from quantkit.core.types import LowRankWeight, NMSparseWeight, QuantizedWeight, W8A8Weight
from quantkit.methods.smoothquant import quantize_int8_weight
from quantkit.runtime.modules import KINDS, runtime_module_class
from quantkit.runtime.swap import BUILDERS, to_module


def _results():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 16, generator=g)
    spec = QuantSpec(4, 8, sym=False)
    q, s, z = quantize_rtn(w, spec)
    yield QuantizedWeight(q, s, z, spec)
    yield W8A8Weight(*quantize_int8_weight(w))
    yield NMSparseWeight.from_dense(w * nm_mask(w.abs(), 2, 4), 2, 4)
    yield LowRankWeight(torch.randn(3, 16, generator=g), torch.randn(12, 3, generator=g))


def test_every_result_type_has_a_builder_and_a_loader():
    result_types = {c for c in vars(types).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
                    and isinstance(getattr(c, "kind", None), str) and c is not types.PackedEntry}
    assert result_types == set(BUILDERS)
    assert {c.kind for c in result_types} == set(KINDS)


@pytest.mark.parametrize("result", list(_results()), ids=lambda r: type(r).__name__)
def test_built_module_round_trips_through_its_checkpoint_entry(result):
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(12)
    built = to_module(result, bias, torch.float32)
    empty = runtime_module_class(result.config_entry()["kind"]).from_entry(16, 12, result.config_entry(), bias=True,
                                                                            dtype=torch.float32)
    empty.load_state_dict(built.state_dict())
    assert torch.equal(empty(x), built(x))


def test_an_unknown_result_type_is_refused():
    with pytest.raises(TypeError, match="no runtime module"):
        to_module(object(), None, torch.float32)


@pytest.mark.parametrize("act_bits,group", [(None, 8), (8, -1)])
def test_a_quant_module_describes_itself_as_its_result_does(act_bits, group):
    """QuantLinear.config_entry (what an imported model's config is built from) is its result's entry."""
    w = torch.randn(12, 16, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(4, group, sym=act_bits is None)
    result = QuantizedWeight(*quantize_rtn(w, spec), spec, act_bits=act_bits, act_clip=0.9 if act_bits else 1.0)
    assert to_module(result, None, torch.float32).config_entry() == result.config_entry()
