"""The W8A16 Triton kernel against the reference, in the interpreter."""

import pytest
import torch

from quantkit.kernels.layout import int8_weight_from_codes
from quantkit.kernels.reference import w8a16_matmul_ref
from quantkit.kernels.w8a16 import w8a16_matmul

CFG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)


@pytest.mark.parametrize("m,n,k,gs,sym,act", [
    (1, 1, 40, 40, True, False),
    (3, 33, 72, 24, False, True),
    (17, 5, 40, 8, False, False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a16_matches_reference(m, n, k, gs, sym, act, dtype, make_format, close):
    q, s, z, g = make_format(n, k, gs, 8, sym, act)
    w = int8_weight_from_codes(q, s, z, g, gs)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = w8a16_matmul(x, w, config=CFG)
    assert y.dtype == dtype and y.shape == (m, n)
    close(y, w8a16_matmul_ref(x, w), dtype)


def test_w8a16_default_config_fp16(make_format, close):
    q, s, z, g = make_format(20, 48, 16, 8, True, False)
    w = int8_weight_from_codes(q, s, z, g, 16)
    x = torch.randn(2, 3, 48).half()
    close(w8a16_matmul(x, w), w8a16_matmul_ref(x, w), torch.float16)
