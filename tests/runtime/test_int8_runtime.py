"""Int8Linear: a real int8 x int8 -> int32 matmul, matching its integer reference exactly."""

import pytest
import torch

from quantkit.runtime.swap import to_module

from quantkit.methods.smoothquant import quantize_int8_weight
from quantkit.core.types import W8A8Weight
from quantkit.runtime.backends import use_backend
from quantkit.runtime.int8 import Int8Linear, quantize_activations
from quantkit.runtime.modules import runtime_module_class


def _layer(out_f, in_f, bias=True, static=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    q, s = quantize_int8_weight(w)
    b = torch.randn(out_f, generator=g) if bias else None
    return w, Int8Linear.from_quantized(q, s, static, b)


def _integer_reference(lin, x):
    """The same computation in exact int64 arithmetic, scaled in float32 at the end."""
    x_q, x_s = quantize_activations(x.reshape(-1, lin.in_features), lin.act_scale)
    acc = x_q.long() @ lin.qweight.long().t()
    y = acc.float() * x_s[:, None] * lin.w_scales[None, :]
    return (y + lin.bias if lin.bias is not None else y).reshape(*x.shape[:-1], lin.out_features)


@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (5, 172, 37), (17, 40, 8), (3 * 33, 96, 130)])
@pytest.mark.parametrize("static", [None, 0.05])
def test_int8_linear_matches_integer_reference(m, k, n, static, monkeypatch):
    w, lin = _layer(n, k, static=static)
    x = torch.randn(m, k)
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append((a.dtype, b.dtype)) or real(a, b))
    with use_backend("cpu"):
        y = lin(x)
    assert calls == [(torch.int8, torch.int8)]  # one int8 GEMM, no float fallback
    assert torch.allclose(y, _integer_reference(lin, x), rtol=1e-5, atol=1e-5)
    with use_backend("reference"):
        assert torch.allclose(lin(x), y, rtol=1e-5, atol=1e-5)
    if static is None:  # dynamic W8A8 is close to the float layer
        ref = x @ w.t() + lin.bias
        assert float((y - ref).norm() / ref.norm()) < 0.02


def test_int8_linear_keeps_leading_dims_and_dtype():
    _, lin = _layer(24, 32, bias=False)
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    lin.to(torch.bfloat16)
    y = lin(x)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    assert lin.qweight.dtype == torch.int8  # .to(dtype) moves float buffers only


def test_activation_quantization_per_token_and_static():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [100.0, 1.0, -3.0]])
    q, s = quantize_activations(x)
    assert torch.allclose(s, torch.tensor([2 / 127, 1e-8, 100 / 127]))
    assert q.dtype == torch.int8 and int(q[0].abs().max()) == 127 and int(q[2, 0]) == 127
    q, s = quantize_activations(x, torch.tensor([0.01]))
    assert torch.equal(s, torch.full((3,), 0.01)) and int(q[2, 0]) == 127 and int(q[0, 1]) == -127  # saturates


def test_w8a8_result_round_trips_through_state_dict():
    w = torch.randn(12, 16)
    q, s = quantize_int8_weight(w)
    qw = W8A8Weight(q, s, act_scale=0.02)
    entry = qw.config_entry()
    assert entry["kind"] == "w8a8" and entry["act"] == "static"
    built = to_module(qw, torch.zeros(12), torch.float32)
    empty = runtime_module_class("w8a8").from_entry(16, 12, entry, bias=True, dtype=torch.float32)
    empty.load_state_dict(built.state_dict())
    for name, t in built.state_dict().items():
        assert torch.equal(empty.state_dict()[name], t), name
    assert torch.equal(built.dequantized_weight(), qw.dequantized())
