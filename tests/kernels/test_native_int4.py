"""quantkit's native int4 kernel (kernels/int4_gemm.c, quantkit/kernels/native/int4.py) against the pure-torch reference."""

import copy

import pytest
import torch

from quantkit.kernels import cpu as cpu_kernels
from quantkit.kernels.native import build, int4
from quantkit.kernels.layout import group_map
from quantkit.core.quant import dequantize

pytestmark = pytest.mark.skipif(not build.available(), reason=f"native int4 kernel unavailable: {build.library()}")

BF16 = torch.bfloat16
# bf16 activations (8-bit mantissa), float32 sums: ~2e-3 relative; the float32 path is exact up to summation order
TOL = {BF16: 5e-3, torch.float32: 1e-5}


def _format(n, k, gs, sym=True, act=False, seed=0):
    """Codes, fp16-exact scales, integer zeros and (act-order) a column order, like a checkpoint."""
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if gs == -1 else k // gs
    q = torch.randint(0, 16, (n, k), generator=g)
    s = (torch.rand(n, n_groups, generator=g) * 0.1 + 0.01).half().float()
    z = torch.full((n, n_groups), 8.0) if sym else torch.randint(0, 16, (n, n_groups), generator=g).float()
    perm = torch.randperm(k, generator=g) if act else None
    return q, s, z, perm


def _weight_in_layout_order(q, s, z, gs):
    return dequantize(q, s, z, group_map(None, q.shape[1] if gs == -1 else gs, q.shape[1]))


def _rel(y, ref):
    return float((y.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("m,n,k,gs,sym,act", [
    (1, 1, 64, 32, True, False),       # N = 1: one masked 16-row tile
    (1, 17, 64, 64, False, False),     # N % 16 != 0
    (2, 40, 172, -1, False, False),    # per channel, K % 8 != 0: K padded inside
    (3, 32, 96, -1, True, True),       # act-order: x gathered by the column order
    (5, 48, 256, 128, False, False),   # M = 5: a 4-row tile plus one row
    (9, 16, 128, 32, True, False),     # M = 9: 4 + 4 + 1
    (7, 64, 48, 16, False, False),     # group 16 (PyTorch's op has no such group)
])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_matches_reference(m, n, k, gs, sym, act, dtype):
    q, s, z, perm = _format(n, k, gs, sym, act)
    w = int4.int4_weight(q, s, z, perm, k if gs == -1 else gs)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
    y = int4.int4_matmul(x, w, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    xs = x if perm is None else x[:, perm]
    W = _weight_in_layout_order(q, s, z, gs)
    ref = xs.float() @ W.t() + bias
    # rounding x (and a bf16 output) to bf16 moves each product by at most 2**-9 of its size
    bound = 2 * 2**-9 * (xs.float().abs() @ W.abs().t() + bias.abs()) + 1e-6
    assert ((y.float() - ref).abs() <= bound).all()


@pytest.mark.parametrize("n,k,gs,sym", [(40, 172, -1, False), (33, 128, 32, True), (16, 64, 64, False)])
def test_dequantize_is_exact(n, k, gs, sym):
    q, s, z, _ = _format(n, k, gs, sym)
    w = int4.int4_weight(q, s, z, None, k if gs == -1 else gs)
    ref = _weight_in_layout_order(q, s, z, gs)
    assert torch.equal(int4.dequantize_rows(w, 0, n, torch.float32), ref)
    assert torch.equal(int4.dequantize_rows(w, 16, n, torch.float32), ref[16:])
    assert torch.equal(int4.dequantize_rows(w, 0, n, BF16), ref.to(BF16))


@pytest.mark.parametrize("act", [False, True])
def test_many_float32_rows_take_the_exact_path(act, monkeypatch):
    """Prefill of a float32 model: float32 GEMM on the exact weight, in bounded row chunks."""
    monkeypatch.setattr(cpu_kernels, "DEQUANT_CHUNK_ELEMENTS", 16 * 64)  # force several chunks of 16 rows
    n, k, gs = 40, 64, 32
    q, s, z, perm = _format(n, k, gs, sym=False, act=act)
    w = cpu_kernels.cpu_int4_weight(q, s, z, None if perm is None else perm.argsort() // gs, gs)
    x = torch.randn(2, cpu_kernels.FP32_EXACT_MIN_TOKENS, k, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
    ref = x @ dequantize(q, s, z, group_map(None if perm is None else perm.argsort() // gs, gs, k).to(torch.int32)).t() + bias
    y = cpu_kernels.cpu_int4_matmul(x, w, bias)
    assert _rel(y, ref) < TOL[torch.float32]
    few = cpu_kernels.cpu_int4_matmul(x[0, :3], w, bias)  # decode-sized: the bf16 kernel
    assert 1e-5 < _rel(few, ref[0, :3]) < TOL[BF16]


def test_threads_do_not_change_the_result():
    q, s, z, _ = _format(1024, 512, 64)
    w = int4.int4_weight(q, s, z, None, 64)
    x = torch.randn(3, 512).to(BF16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = int4.int4_matmul(x, w)
        torch.set_num_threads(2)
        y2 = int4.int4_matmul(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)


def test_layout_survives_deepcopy():
    q, s, z, _ = _format(16, 64, 32)
    w = int4.int4_weight(q, s, z, None, 32)
    x = torch.randn(1, 64)
    w2 = copy.deepcopy(w)
    assert w2.desc.contents.w == w2.w.data_ptr() != w.w.data_ptr()
    del w
    assert torch.equal(int4.int4_matmul(x, w2), int4.int4_matmul(x, copy.deepcopy(w2)))


def test_custom_op_matches_the_direct_call():
    """What torch.compile calls (``quantkit::int4_mm``) computes what eager calls."""
    q, s, z, perm = _format(24, 64, 32, sym=False, act=True)
    w = int4.int4_weight(q, s, z, perm, 32)
    x = torch.randn(2, 64)
    y = torch.ops.quantkit.int4_mm(x, w.w, w.s16, w.z, w.perm, None, w.in_features, w.k_padded, w.group_size,
                                   w.out_features, w.zconst)
    assert torch.equal(y, int4.int4_matmul(x, w))
    d = torch.ops.quantkit.int4_dequant(w.w, w.s16, w.z, w.in_features, w.k_padded, w.group_size, w.zconst, 0, 24,
                                        torch.float32)
    assert torch.equal(d, int4.dequantize_rows(w, 0, 24, torch.float32))


@pytest.mark.parametrize("native", ["1", "0"])
def test_float32_perplexity_on_the_cpu_path_equals_the_reference(native, stories, eval_windows, monkeypatch):
    """Windows of many rows take the exact float32 path: a packed float32 model's perplexity on
    the default CPU path is the reference backend's (GPTQ's published protocol is float32)."""
    from quantkit import api
    from quantkit.runtime.swap import pack_model
    from quantkit.eval.perplexity import perplexity
    from quantkit.runtime.backends import reset_backends, use_backend

    model, _ = stories
    res = api.compress(model, "rtn", dict(bits=4, group_size=32, quantize_lm_head=True,
                                          overrides=((r"mlp\.down_proj", {"group_size": -1}),)))
    pack_model(model, res.quantized)
    with use_backend("reference"):
        ref = perplexity(model, eval_windows[:4])["perplexity"]
    reset_backends(model)
    monkeypatch.setenv("QUANTKIT_NATIVE", native)  # "0": PyTorch's op layout, float32 prefill by the reference
    build.library.cache_clear()
    try:
        with use_backend("cpu"):
            fast = perplexity(model, eval_windows[:4])["perplexity"]
            layout = int4.NativeInt4Weight if native == "1" else cpu_kernels.CpuInt4Weight
            assert isinstance(model.model.layers[0].self_attn.q_proj.kernel_weight, layout)
    finally:
        monkeypatch.delenv("QUANTKIT_NATIVE")
        build.library.cache_clear()
    assert abs(fast - ref) / ref < 1e-5
