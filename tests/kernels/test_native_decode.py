"""One decode step in C (kernels/decode_step.c through quantkit/kernels/native/decode.py) against a
pure-torch step over the same int4 weights: RMSNorm, q/k/v (+ biases), RoPE, the cache write,
grouped-query attention, o, SiLU MLP; a head dimension past 1024 included."""

import pytest
import torch
import torch.nn.functional as F

from quantkit.core.quant import dequantize
from quantkit.kernels.layout import group_map
from quantkit.kernels.native import build, decode, int4

pytestmark = pytest.mark.skipif(not build.available(), reason=f"native kernels unavailable: {build.library()}")


def _linear(n, k, g):
    """A random int4 linear ``[n, k]`` (per channel): the native layout and its float32 weight."""
    q = torch.randint(0, 16, (n, k), generator=g)
    s = (torch.rand(n, 1, generator=g) * 0.02 + 0.005).half().float()
    z = torch.randint(4, 12, (n, 1), generator=g).float()
    return int4.int4_weight(q, s, z, None, k), dequantize(q, s, z, group_map(None, k, k))


def _mm(x, w, b=None):
    """What qk_int4_mm computes: x rounded to bf16, float32 sums."""
    y = x.to(torch.bfloat16).float() @ w.t()
    return y if b is None else y + b


def _rms(x, w, eps):
    return x * torch.rsqrt(x.double().pow(2).mean() + eps).float() * w


def _reference_step(lay, x, pos, cos, sin, nh, nkv, hd, scale):
    """LeanLM's single-token step, written out in torch for one block."""
    (wq, wk, wv, wo, wg, wu, wd), (bq, bk, bv) = lay["W"], lay["biases"]
    h = _rms(x, lay["norm1"], 1e-5)
    q, k, v = _mm(h, wq, bq).view(nh, hd), _mm(h, wk, bk).view(nkv, hd), _mm(h, wv, bv).view(nkv, hd)
    q, k = q * cos + q.roll(hd // 2, -1) * sin, k * cos + k.roll(hd // 2, -1) * sin
    lay["k_ref"][:, pos], lay["v_ref"][:, pos] = k, v
    keys = lay["k_ref"][:, : pos + 1].repeat_interleave(nh // nkv, 0)  # [nh, len, hd]
    vals = lay["v_ref"][:, : pos + 1].repeat_interleave(nh // nkv, 0)
    att = torch.softmax((keys @ q[:, :, None])[..., 0] * scale, -1)[:, None, :] @ vals  # [nh, 1, hd]
    x = x + _mm(att.reshape(-1), wo)
    h = _rms(x, lay["norm2"], 1e-5)
    return x + _mm(F.silu(_mm(h, wg)) * _mm(h, wu), wd)


def _layer(d, nh, nkv, hd, inter, max_len, g):
    shapes = ((nh * hd, d), (nkv * hd, d), (nkv * hd, d), (d, nh * hd), (inter, d), (inter, d), (d, inter))
    native, ref = zip(*(_linear(n, k, g) for n, k in shapes))
    biases = tuple(torch.randn(n, generator=g) * 0.1 for n in (nh * hd, nkv * hd, nkv * hd))
    lay = {"native": native, "W": ref, "biases": biases, "norm1": 1 + 0.1 * torch.randn(d, generator=g),
           "norm2": 1 + 0.1 * torch.randn(d, generator=g), "k": torch.zeros(nkv, max_len, hd),
           "v": torch.zeros(nkv, max_len, hd), "k_ref": torch.zeros(nkv, max_len, hd),
           "v_ref": torch.zeros(nkv, max_len, hd)}
    lay["struct"] = decode.layer_struct(native, biases, lay["norm1"], lay["norm2"], 1e-5, 1e-5, lay["k"], lay["v"])
    return lay


@pytest.mark.parametrize("d,nh,nkv,hd,inter", [
    (64, 4, 2, 16, 48),     # grouped-query heads, inter not a multiple of 16
    (32, 2, 1, 1040, 40),   # a head dimension past 1024 (once a fixed buffer in C)
])
def test_decode_step_matches_torch(d, nh, nkv, hd, inter):
    g = torch.Generator().manual_seed(hd)
    max_len, scale = 8, hd ** -0.5
    layers = [_layer(d, nh, nkv, hd, inter, max_len, g) for _ in range(2)]
    structs = decode.layer_array([lay["struct"] for lay in layers])
    dims = decode.decode_dims(d, nh, nkv, hd, inter, max_len, scale)
    cos, sin = torch.randn(max_len, hd, generator=g), torch.randn(max_len, hd, generator=g)
    for pos in range(4):
        x = torch.randn(d, generator=g)
        ref = x.clone()
        for lay in layers:
            ref = _reference_step(lay, ref, pos, cos[pos], sin[pos], nh, nkv, hd, scale)
        assert decode.decode_layers(structs, dims, x, pos, cos[pos].contiguous(), sin[pos].contiguous()) is x
        assert float((x - ref).norm() / ref.norm()) < 1e-4
        for lay in layers:
            for got, want in ((lay["k"], lay["k_ref"]), (lay["v"], lay["v_ref"])):
                assert float((got - want).norm() / want.norm()) < 1e-4
                assert not got[:, pos + 1:].any()  # only this position written


def test_decode_dims_reject_heads_the_kv_heads_do_not_share_evenly():
    with pytest.raises(ValueError, match="kv heads"):
        decode.decode_dims(64, 6, 4, 16, 48, 8, 0.25)
