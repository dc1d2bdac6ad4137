"""``QuantLinear`` forced onto the Triton path (run by the interpreter here) against the reference."""

import pytest
import torch

from quantkit.kernels.layout import Int4Weight, Int8Weight
from quantkit.core.quant import QuantSpec, quantize_rtn
from quantkit.runtime.backends import reset_backends, set_backend, use_backend
from quantkit.runtime.qlinear import QuantLinear


@pytest.fixture(autouse=True)
def _clean_setting():
    set_backend(None)
    yield
    set_backend(None)


@pytest.mark.parametrize("bits,group_size,sym,act_order,layout", [
    (4, 32, True, False, Int4Weight),   # packed bytes reused as int32 words
    (4, 16, False, True, Int4Weight),
    (3, 32, False, False, Int4Weight),  # 3-bit codes repacked as nibbles with explicit zeros
    (8, -1, True, False, Int8Weight),
    (8, 16, False, False, Int8Weight),
    (6, 32, True, False, Int8Weight),   # 6-bit symmetric: explicit zero 32
])
@pytest.mark.parametrize("m", [1, 18])
def test_quantlinear_triton_path(bits, group_size, sym, act_order, layout, m, close):
    g = torch.Generator().manual_seed(bits)
    n, k = 20, 64
    q, s, z = quantize_rtn(torch.randn(n, k, generator=g), QuantSpec(bits, group_size, sym))
    g_idx = None
    if act_order:
        g_idx = (torch.randperm(k, generator=g) // group_size).to(torch.int32)
    lin = QuantLinear.from_codes(q, s, z, bits, group_size, sym, g_idx=g_idx, bias=torch.randn(n, generator=g))
    x = torch.randn(m, k, generator=g)
    with use_backend("reference"):
        ref = lin(x)
    reset_backends(lin)
    with use_backend("triton"):
        y = lin(x)
    assert isinstance(lin.kernel_weight, layout)
    close(y, ref, torch.float32)
