"""The online Hadamard transform in C (kernels/hadamard.c, quantkit/kernels/native/hadamard.py)
against its pure-torch reference, HadamardTransform, and its use by the runtime (runtime/online.py)."""

import pytest
import torch
from torch import nn

from quantkit.core.hadamard import HadamardTransform
from quantkit.core.rotation import OnlineHadamard
from quantkit.kernels.native import NativeHadamard, build, hadamard_available, hadamard_rows
from quantkit.runtime.online import use_native_transforms

NEEDS_C = pytest.mark.skipif(not hadamard_available(), reason=f"no C compiler: {build.portable_library()}")


@NEEDS_C
@pytest.mark.parametrize("n", [1, 2, 40, 64, 172, 576, 1536, 4096])
def test_matches_the_torch_transform_and_its_inverse(n):
    t = HadamardTransform(n)
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    y = hadamard_rows(x, t.factor)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y, t(x), atol=1e-5, rtol=1e-5)
    assert torch.allclose(hadamard_rows(y, t.factor.t()), x, atol=1e-5)  # A^T undoes it
    assert torch.allclose(hadamard_rows(x.bfloat16(), t.factor), t(x.bfloat16().float()), atol=1e-5)


@NEEDS_C
def test_a_row_gives_the_same_bits_alone_or_in_a_batch():
    t = HadamardTransform(1536)
    x = torch.randn(37, 1536, generator=torch.Generator().manual_seed(0)) * 10
    native = NativeHadamard(t.factor, 1536)
    batch = native(x)
    for i in (0, 5, 36):
        assert torch.equal(native(x[i:i + 1]), batch[i:i + 1])
    assert torch.equal(native(x[3:9]), batch[3:9])


@NEEDS_C
def test_input_is_not_modified_and_sizes_are_checked():
    t = HadamardTransform(576)
    x = torch.randn(2, 576)
    before = x.clone()
    hadamard_rows(x, t.factor)
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="n = k \\* 2\\^m"):
        hadamard_rows(torch.randn(2, 36 * 3), t.factor)  # 108 = 36 x 3
    with pytest.raises(ValueError, match="576 features"):
        NativeHadamard(t.factor, 576)(torch.randn(2, 64))


def _rotated_linear(n=1536):
    lin = nn.Linear(n, 8)
    lin.register_forward_pre_hook(OnlineHadamard(n))
    return nn.Sequential(lin)


@NEEDS_C
def test_the_runtime_points_online_hooks_at_the_c_transform():
    model = _rotated_linear()
    x = torch.randn(4, 1536).bfloat16()
    ref = model[0]._forward_pre_hooks[next(iter(model[0]._forward_pre_hooks))](model[0], (x,))[0]
    assert use_native_transforms(model) == 1
    hook = next(iter(model[0]._forward_pre_hooks.values()))
    assert isinstance(hook.kernel, NativeHadamard)
    y = hook(model[0], (x,))[0]
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), ref.float(), atol=2e-2)
    assert use_native_transforms(nn.Sequential(nn.Linear(4, 4))) == 0  # nothing rotated


def test_without_the_library_the_hooks_keep_the_torch_products(monkeypatch):
    monkeypatch.setenv("QUANTKIT_NATIVE", "0")
    build.portable_library.cache_clear()
    try:
        assert not hadamard_available() and "QUANTKIT_NATIVE" in str(build.portable_library())
        model = _rotated_linear(64)
        assert use_native_transforms(model) == 0
        assert next(iter(model[0]._forward_pre_hooks.values())).kernel is None
        assert model(torch.randn(2, 64)).shape == (2, 8)
    finally:
        monkeypatch.delenv("QUANTKIT_NATIVE")
        build.portable_library.cache_clear()
