"""CPU fast paths (quantkit's int4 kernel, PyTorch's int4 / int8 / int_mm ops) against the reference."""

import pytest
import torch

from quantkit.kernels.native import build as native_build
from quantkit.kernels.cpu import (
    CpuInt4Weight,
    NativeInt4Weight,
    cpu_int4_matmul,
    cpu_int4_weight,
    cpu_int8_weight,
    cpu_int8_weight_matmul,
    dense_matmul,
    dense_weight,
    int8_matmul_cpu,
)
from quantkit.kernels.layout import group_map
from quantkit.kernels.reference import int8_matmul_ref
from quantkit.core.quant import dequantize

BF16 = torch.bfloat16


def _ref(x, q, s, z, g, gs, bits):
    z = z if z is not None else torch.full_like(s, 2 ** (bits - 1))
    return x.float() @ dequantize(q, s, z, group_map(g, gs, q.shape[1])).t()


def _zeros(s, z, bits):
    return z if z is not None else torch.full_like(s, 2 ** (bits - 1))


NATIVE = [pytest.param(True, marks=pytest.mark.skipif(not native_build.available(), reason="native int4 kernel unavailable")),
          False]


@pytest.mark.parametrize("m,n,k,gs,bits,sym,act", [
    (1, 16, 64, 32, 4, True, False),
    (3, 24, 128, 64, 4, False, False),    # N % 16 != 0: padded rows
    (1, 1, 96, 96, 4, False, False),      # N = 1; per-channel 96 -> op groups of 32
    (5, 32, 256, 128, 4, True, True),     # act-order: columns sorted, x gathered
    (2, 16, 512, 256, 3, False, False),   # 3-bit codes as nibbles
    (2, 16, 64, 32, 2, True, False),      # 2-bit symmetric (zero 2)
])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("native", NATIVE)
def test_cpu_int4_matches_reference(m, n, k, gs, bits, sym, act, dtype, native, make_format, close):
    q, s, z, g = make_format(n, k, gs, bits, sym, act)
    w = cpu_int4_weight(q, s, _zeros(s, z, bits), g, gs, native=native)
    assert isinstance(w, NativeInt4Weight if native else CpuInt4Weight)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(0)).to(dtype)
    b = torch.randn(n, generator=torch.Generator().manual_seed(3))
    y = cpu_int4_matmul(x, w, b)
    assert y.dtype == dtype and y.shape == (m, n)
    close(y, _ref(x, q, s, z, g, gs, bits) + b, BF16)  # computed in bf16 whatever x's dtype (few rows)


@pytest.mark.parametrize("native", NATIVE)
def test_cpu_int4_declines_what_no_path_can_do(native, make_format):
    q, s, z, g = make_format(16, 48, 12)  # group 12: not a multiple of 8 (native), no op group divides it
    assert cpu_int4_weight(q, s, _zeros(s, z, 4), g, 12, native=native) is None
    q, s, z, _ = make_format(16, 64, 32)
    uneven = torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32)  # act-order groups of unequal size
    assert cpu_int4_weight(q, s, _zeros(s, z, 4), uneven, 32, native=native) is None


def test_torch_op_fallback_declines_group_16_that_native_takes(make_format):
    q, s, z, g = make_format(16, 48, 16)
    assert cpu_int4_weight(q, s, _zeros(s, z, 4), g, 16, native=False) is None
    if native_build.available():
        assert isinstance(cpu_int4_weight(q, s, _zeros(s, z, 4), g, 16), NativeInt4Weight)


@pytest.mark.parametrize("m,n,k,bits,sym", [
    (1, 5, 64, 8, True),
    (3, 17, 40, 8, False),   # K % 16 != 0: zero-padded (the bf16 op reads past K otherwise)
    (2, 8, 48, 6, False),    # 6-bit codes shifted into int8
])
def test_cpu_int8_weight_only_matches_reference(m, n, k, bits, sym, make_format, close):
    q, s, z, g = make_format(n, k, k, bits, sym)
    w = cpu_int8_weight(q, s, _zeros(s, z, bits), bits)
    x = torch.randn(2, m, k)
    y = cpu_int8_weight_matmul(x, w)
    assert y.dtype == torch.float32 and y.shape == (2, m, n)
    close(y, _ref(x, q, s, z, g, k, bits), BF16)


def test_cpu_int8_declines_group_wise(make_format):
    q, s, z, _ = make_format(4, 64, 32, 8)
    assert cpu_int8_weight(q, s, _zeros(s, z, 8), 8) is None


def test_dense_fallback_group_wise_8bit(make_format, close):
    q, s, z, g = make_format(7, 64, 16, 8, False, True)
    w = dense_weight(q, s, z, g)
    x = torch.randn(3, 64)
    close(dense_matmul(x, w), _ref(x, q, s, z, g, 16, 8), BF16)


@pytest.mark.parametrize("m,n,k", [(1, 1, 8), (5, 33, 72), (32, 16, 64)])
def test_int_mm_path_is_exact_before_scaling(m, n, k, close):
    g = torch.Generator().manual_seed(m)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    xs, ws, b = torch.rand(m) + 0.1, torch.rand(n) + 0.1, torch.randn(n)
    y = int8_matmul_cpu(x, w, xs, ws, torch.float32, b)
    close(y, int8_matmul_ref(x, w, xs, ws, torch.float32, b), torch.float32)
    assert int8_matmul_cpu(x, w, xs, ws).dtype == BF16
