"""The Triton kernels compiled for a real GPU (``pytest -m gpu``; skipped without CUDA) against
their torch references, through the runtime's automatic choice (CUDA -> Triton, autotuned)."""

import pytest
import torch

from quantkit.core.quant import QuantSpec, quantize_rtn
from quantkit.kernels import int8_matmul, int8_matmul_ref, w4a16_matmul_ref, w8a16_matmul_ref
from quantkit.kernels.layout import Int4Weight, Int8Weight, int4_weight_from_codes, int8_weight_from_codes
from quantkit.kernels.w4a16 import w4a16_matmul
from quantkit.kernels.w8a16 import w8a16_matmul
from quantkit.runtime.backends import reset_backends, use_backend
from quantkit.runtime.qlinear import QuantLinear

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("m", [1, 8, 16, 17, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sym,act_order", [(True, False), (False, True)])
def test_w4a16_and_w8a16_on_cuda(m, dtype, sym, act_order, make_format, close):
    n, k, gs = 384, 512, 64
    q, s, z, g = make_format(n, k, gs, 4, sym, act_order)
    w = int4_weight_from_codes(q.cuda(), s.cuda(), None if z is None else z.cuda(), None if g is None else g.cuda(), gs)
    x = (torch.randn(m, k) * 0.5).to("cuda", dtype)
    close(w4a16_matmul(x, w), w4a16_matmul_ref(x, w), dtype)
    q8, s8, z8, g8 = make_format(n, k, gs, 8, sym, act_order)
    w8 = int8_weight_from_codes(q8.cuda(), s8.cuda(), None if z8 is None else z8.cuda(), None if g8 is None else g8.cuda(), gs)
    close(w8a16_matmul(x, w8), w8a16_matmul_ref(x, w8), dtype)


@pytest.mark.parametrize("m", [1, 33])
def test_w8a8_on_cuda(m, close):
    k, n = 512, 256
    xi = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    wi = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    xs, ws = torch.rand(m, 1, device="cuda"), torch.rand(1, n, device="cuda") * 0.01
    close(int8_matmul(xi, wi, xs, ws, torch.bfloat16, backend="triton"),
          int8_matmul_ref(xi, wi, xs, ws, torch.float32), torch.bfloat16)


@pytest.mark.parametrize("bits,layout", [(4, Int4Weight), (3, Int4Weight), (8, Int8Weight)])
def test_quantlinear_picks_triton_on_cuda(bits, layout, close):
    g = torch.Generator().manual_seed(bits)
    q, s, z = quantize_rtn(torch.randn(96, 256, generator=g), QuantSpec(bits, 64, False))
    lin = QuantLinear.from_codes(q, s, z, bits, 64, False, bias=torch.randn(96, generator=g))
    x = torch.randn(5, 256, generator=g)
    with use_backend("reference"):
        ref = lin(x)
    reset_backends(lin)
    lin = lin.to("cuda", torch.float16)
    y = lin(x.to("cuda", torch.float16))
    assert isinstance(lin.kernel_weight, layout) and y.device.type == "cuda"
    close(y.cpu(), ref, torch.float16)
