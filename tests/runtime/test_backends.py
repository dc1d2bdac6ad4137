"""The one place that picks a kernel path: device rules, overrides, and each CPU path
through ``QuantLinear`` against the reference."""

import pytest
import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.kernels.native import build as native_build
from quantkit.kernels.cpu import CpuInt4Weight, CpuInt8Weight, DenseWeight, NativeInt4Weight
from quantkit.core.quant import QuantSpec, quantize_rtn
from quantkit.runtime import backends
from quantkit.runtime.backends import (
    int8_matmul,
    kernel_weight_bytes,
    reference_forward,
    reset_backends,
    resolve_backend,
    set_backend,
    use_backend,
)
from quantkit.runtime.qlinear import QuantLinear

BF16_TOL = 1.5e-2  # CPU paths compute in bf16


@pytest.fixture(autouse=True)
def _clean_setting(monkeypatch):
    monkeypatch.delenv("QUANTKIT_BACKEND", raising=False)
    set_backend(None)
    yield
    set_backend(None)


def rel_err(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def make_qlinear(n=32, k=128, bits=4, group_size=64, sym=True, act_order=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q, s, z = quantize_rtn(w, QuantSpec(bits, group_size, sym))
    g_idx = None
    if act_order:  # GPTQ-style: a column permutation, groups of group_size in permuted order
        gs = k if group_size == -1 else group_size
        g_idx = torch.argsort(torch.randperm(k, generator=g)).to(torch.int32) // gs
        # re-quantize so codes agree with the act-order grouping
        perm = torch.argsort(g_idx.long(), stable=True)
        qp, s, z = quantize_rtn(w[:, perm], QuantSpec(bits, group_size, sym))
        q = torch.empty_like(qp)
        q[:, perm] = qp
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_codes(q, s, z, bits, group_size, sym, g_idx=g_idx, bias=b)


# ---- the decision ----------------------------------------------------------------------------
def test_auto_rules_by_device():
    assert resolve_backend("cpu") == "cpu"
    assert resolve_backend("meta") == "reference"


def test_env_var_then_set_backend_override(monkeypatch):
    monkeypatch.setenv("QUANTKIT_BACKEND", "reference")
    assert resolve_backend("cpu") == "reference"
    set_backend("cpu")
    assert resolve_backend("cpu") == "cpu"
    set_backend(None)
    assert resolve_backend("cpu") == "reference"
    with use_backend("auto"):
        assert resolve_backend("cpu") == "cpu"
    assert backends.backend_setting() == "reference"


def test_bad_settings_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("QUANTKIT_BACKEND", "tpu")
    with pytest.raises(QuantkitError, match="unknown backend 'tpu'"):
        resolve_backend("cpu")
    with pytest.raises(QuantkitError, match="unknown backend"):
        set_backend("fast")
    monkeypatch.delenv("QUANTKIT_BACKEND")
    with use_backend("cpu"), pytest.raises(QuantkitError, match="forced"):
        resolve_backend("meta")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with use_backend("triton"), pytest.raises(QuantkitError, match="GPU"):
        resolve_backend("cpu")


# ---- each CPU path through QuantLinear ----------------------------------------------------------
INT4 = NativeInt4Weight if native_build.available() else CpuInt4Weight  # quantkit's kernel, else PyTorch's op


@pytest.mark.parametrize("bits,group_size,sym,act_order,layout", [
    (4, 64, True, False, INT4),
    (4, 32, False, True, INT4),    # act-order: columns permuted, x gathered
    (4, -1, False, False, INT4),   # per-channel (the op: split into equal-scale groups)
    (3, 64, False, False, INT4),   # 3-bit codes as nibbles
    (8, -1, True, False, CpuInt8Weight),
    (6, -1, False, False, CpuInt8Weight),
    (8, 32, False, False, DenseWeight),     # group-wise 8-bit: no CPU op, dequantized once
    (4, 16, True, False, INT4 if INT4 is NativeInt4Weight else DenseWeight),  # group 16: below the op's minimum
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_matches_reference(bits, group_size, sym, act_order, layout, dtype):
    m = make_qlinear(n=24, k=128, bits=bits, group_size=group_size, sym=sym, act_order=act_order, bias=True)
    x = torch.randn(2, 3, 128).to(dtype)
    with use_backend("reference"):
        ref = m(x.float())
    reset_backends(m)
    y = m(x)
    assert isinstance(m.kernel_weight, layout)
    assert y.dtype == dtype and y.shape == (2, 3, 24)  # float32 in -> float32 out (bf16 inside)
    assert rel_err(y, ref) < BF16_TOL


def test_reference_backend_is_the_dequantized_matmul():
    """The reference path equals a matmul with the weight rebuilt from the codes by hand (the
    grid's definition, ``(q - z) * s`` per group), not with the module's own dequantization."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    q, s, z = quantize_rtn(w, QuantSpec(4, 64, False))  # [32, 128] codes, [32, 2] scales/zeros
    b = torch.randn(32, generator=g)
    m = QuantLinear.from_codes(q, s, z, 4, 64, False, bias=b)
    w_hand = ((q.float() - z.repeat_interleave(64, dim=1)) * s.repeat_interleave(64, dim=1))  # [32, 128]
    x = torch.randn(4, 128, generator=g)
    with use_backend("reference"):
        y = m(x)
    assert m._backend is reference_forward
    assert torch.allclose(y, x @ w_hand.T + b, rtol=1e-5, atol=1e-5)
    assert (w_hand - w).abs().max() < s.max()  # and it is the original weight on its grid


def test_backend_is_chosen_once_and_reset():
    m = make_qlinear()
    x = torch.randn(1, 128)
    m(x)
    first = m._backend
    with use_backend("reference"):
        m(x)
        assert m._backend is first  # modules keep their choice...
        assert reset_backends(nn.Sequential(m)) == 1
        m(x)
        assert m._backend is reference_forward  # ...until reset


def test_prepare_chooses_the_path_once_and_exposes_its_weight():
    m = make_qlinear()
    assert m.kernel_weight is None  # nothing chosen before the first forward
    m.prepare(torch.zeros(1, 128))
    first = m.kernel_weight
    assert isinstance(first, INT4)
    m.prepare(torch.zeros(1, 128))
    m(torch.randn(1, 128))
    assert m.kernel_weight is first  # chosen once: prepare and forward keep it
    with use_backend("reference"):
        reset_backends(m)
        m.prepare(torch.zeros(1, 128))
        assert m.kernel_weight is None and m._backend is reference_forward


def test_kernel_weight_bytes_counts_the_converted_layout():
    m = make_qlinear(n=32, k=128, group_size=64)
    assert kernel_weight_bytes(m) == m.weight_bytes()
    m(torch.randn(1, 128))
    if INT4 is NativeInt4Weight:  # K/2 bytes per row + an fp16 scale per group and row (symmetric: no zeros)
        assert kernel_weight_bytes(m) == 32 * 64 + (128 // 64) * 32 * 2
    else:  # int4 op layout: K/2 bytes per row + (scale, zero) bf16 pairs per group and row
        assert kernel_weight_bytes(m) == 32 * 64 + (128 // 64) * 32 * 2 * 2


def test_tiny_llama_logits_cpu_vs_reference():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, nn.Linear):
                    q, s, z = quantize_rtn(lin.weight.data, QuantSpec(4, 32, False))
                    setattr(parent, name, QuantLinear.from_codes(q, s, z, 4, 32, False))
    ids = torch.randint(0, 96, (1, 12))
    with torch.inference_mode():
        with use_backend("reference"):
            ref = model(ids).logits
        reset_backends(model)
        fast = model.to(torch.bfloat16)(ids).logits
    assert rel_err(fast, ref) < 3e-2  # bf16 model end to end


def test_runtime_int8_matmul_dispatches_on_cpu():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (5, 64), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(5) + 0.1, torch.rand(8) + 0.1
    exact = (x.long() @ w.long().t()).float() * xs[:, None] * ws[None, :]
    assert torch.allclose(int8_matmul(x, w, xs, ws, torch.float32), exact, rtol=1e-6)
    with use_backend("reference"):
        assert torch.allclose(int8_matmul(x, w, xs, ws, torch.float32), exact, rtol=1e-6)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 64, True), (8, -1, False), (8, 32, False), (3, -1, False)])
def test_float32_prefill_is_exact_on_every_cpu_path(bits, group_size, sym):
    """Float32 sequences of >= FP32_EXACT_MIN_TOKENS positions are computed in float32 on the
    exact weight (perplexity on the CPU path equals the reference's); shorter ones and decode
    batches (one position per sequence, however many sequences) take the bf16 paths."""
    from quantkit.kernels.cpu import FP32_EXACT_MIN_TOKENS

    m = make_qlinear(n=24, k=128, bits=bits, group_size=group_size, sym=sym, bias=True)
    x = torch.randn(2, FP32_EXACT_MIN_TOKENS, 128)
    with use_backend("reference"):
        ref = m(x)
    reset_backends(m)
    with use_backend("cpu"):
        y = m(x)
        short = m(x[:, :3])
        batch = m(x.transpose(0, 1)[:, :1])  # [16 sequences, 1 position]: a decode step
        alone = m(x[:1, :1])
    assert rel_err(y, ref) < 1e-6
    assert 1e-6 < rel_err(short, ref[:, :3]) < BF16_TOL
    assert 1e-6 < rel_err(batch, ref.transpose(0, 1)[:, :1]) < BF16_TOL
    assert torch.equal(batch[0], alone[0])  # a row computes the same alone or batched
