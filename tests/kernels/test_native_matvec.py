"""quantkit's native bf16 matrix-vector product (kernels/matvec.c, quantkit/kernels/native/matvec.py)
against float32 math on the same bf16 values."""

import pytest
import torch

from quantkit.kernels.native import build
from quantkit.kernels.native.matvec import bf16_matvec

pytestmark = pytest.mark.skipif(not build.available(), reason=f"native kernels unavailable: {build.library()}")


@pytest.mark.parametrize("n,k", [(1, 2), (7, 576), (49, 100), (300, 64)])
def test_bf16_matvec_matches_reference(n, k):
    """The bf16 head's matrix-vector product against float32 math on the same bf16 values."""
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(k, generator=g)
    ref = w.float() @ x.to(torch.bfloat16).float()
    got = bf16_matvec(x, w)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(bf16_matvec(x, w), got)  # a row's sum never depends on the threads
    finally:
        torch.set_num_threads(previous)
