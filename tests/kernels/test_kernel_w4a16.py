"""The W4A16 Triton kernels (GEMM and split-K decode) against the reference, in the interpreter."""

import pytest
import torch

from quantkit.kernels.layout import int4_weight_from_codes
from quantkit.kernels.reference import w4a16_matmul_ref
from quantkit.kernels.w4a16 import w4a16_matmul

# Block sizes small enough that K=40/72 are not multiples of BLOCK_K and N=33 not of BLOCK_N.
GEMM = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)
SPLITK = dict(BLOCK_N=16, BLOCK_K=16, SPLIT_K=3)

CASES = [  # M, N, K, group_size, sym, act_order
    (1, 1, 40, 8, True, False),      # GEMV, N = 1, K % BLOCK_K != 0
    (1, 33, 72, 24, False, True),    # decode, asym, act-order
    (5, 17, 40, 40, False, False),   # decode, per-channel
    (16, 16, 64, 32, True, True),    # largest decode M
    (17, 1, 40, 8, True, False),     # smallest GEMM M, N = 1
    (33, 33, 72, 24, False, True),   # GEMM, asym, act-order, ragged M/N/K
]


@pytest.mark.parametrize("m,n,k,gs,sym,act", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a16_matches_reference(m, n, k, gs, sym, act, dtype, make_format, close):
    q, s, z, g = make_format(n, k, gs, 4, sym, act)
    w = int4_weight_from_codes(q, s, z, g, gs)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = w4a16_matmul(x, w, config=SPLITK if m <= 16 else GEMM)
    assert y.dtype == dtype and y.shape == (m, n)
    close(y, w4a16_matmul_ref(x, w), dtype)


@pytest.mark.parametrize("m", [1, 20])
def test_w4a16_fp16_default_config_and_batch_dims(m, make_format, close):
    q, s, z, g = make_format(48, 64, 32, 4, False, False)
    w = int4_weight_from_codes(q, s, z, g, 32)
    x = torch.randn(2, m, 64).half()  # leading dims are flattened and restored
    y = w4a16_matmul(x, w)
    assert y.shape == (2, m, 48)
    close(y, w4a16_matmul_ref(x, w), torch.float16)


def test_w4a16_rejects_wrong_k(make_format):
    q, s, z, g = make_format(4, 16, 8)
    with pytest.raises(ValueError, match="input features"):
        w4a16_matmul(torch.randn(1, 8), int4_weight_from_codes(q, s, z, g, 8))
