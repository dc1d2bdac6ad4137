"""The W8A8 Triton kernel and the int8_matmul dispatch table against the reference."""

import pytest
import torch

from quantkit.kernels import int8_matmul
from quantkit.kernels.reference import int8_matmul_ref
from quantkit.kernels.w8a8 import w8a8_matmul

CFG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)


def _operands(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return x, w, torch.rand(m, generator=g) * 0.01 + 1e-3, torch.rand(n, generator=g) * 0.01 + 1e-3


@pytest.mark.parametrize("m,n,k", [(1, 1, 40), (3, 33, 72), (17, 5, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_matches_reference(m, n, k, dtype, close):
    x, w, xs, ws = _operands(m, n, k)
    bias = torch.randn(n) if m == 3 else None
    y = w8a8_matmul(x, w, xs, ws, dtype, bias, config=CFG)
    assert y.dtype == dtype and y.shape == (m, n)
    close(y, int8_matmul_ref(x, w, xs, ws, torch.float32, bias), dtype)


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_int8_matmul_backends_agree(backend, close):
    x, w, xs, ws = _operands(19, 24, 48, seed=1)
    y = int8_matmul(x, w, xs, ws, torch.float32, backend=backend)
    close(y, int8_matmul_ref(x, w, xs, ws), torch.float32)


def test_int8_matmul_unknown_backend():
    x, w, xs, ws = _operands(1, 1, 8)
    with pytest.raises(ValueError, match="unknown"):
        int8_matmul(x, w, xs, ws, backend="mps")


def test_w8a8_rejects_float_inputs():
    x, w, xs, ws = _operands(2, 2, 8)
    with pytest.raises(ValueError, match="int8"):
        w8a8_matmul(x.float(), w, xs, ws)
