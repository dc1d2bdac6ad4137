"""Kernel tests: every Triton kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set by tests/conftest.py before anything imports Triton) and is compared with its torch reference.
"""

import pytest
import torch

# Relative Frobenius error allowed against the float32 reference, by output dtype: the kernels
# accumulate in float32, so what remains is the rounding of the output (and of bf16 inputs).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def random_format(n: int, k: int, group_size: int, bits: int = 4, sym: bool = True, act_order: bool = False, seed: int = 0):
    """Random codes ``[n, k]``, scales/zeros ``[n, G]`` and (act-order) a GPTQ-style ``g_idx``."""
    g = torch.Generator().manual_seed(seed)
    n_groups = k // group_size
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, n_groups, generator=g) * 0.1 + 0.01).half().float()  # fp16-representable, as stored
    zeros = None if sym else torch.randint(0, 2**bits, (n, n_groups), generator=g).float()
    g_idx = (torch.randperm(k, generator=g) // group_size).to(torch.int32) if act_order else None
    return q, scales, zeros, g_idx


def assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = rel_err(y, ref)
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e} for {dtype}"


@pytest.fixture
def make_format():
    return random_format


@pytest.fixture
def close():
    """``close(y, ref, dtype)`` asserts the per-dtype tolerance ``TOL``."""
    return assert_close
