"""One place decides how a quantized matmul runs: CUDA -> Triton, CPU -> PyTorch's own
low-bit ops, anything else -> the pure-torch reference.

A backend is a callable ``(module, x) -> y``.  :func:`select_backend` is called once per
``QuantLinear``, on its first forward: it converts the packed weight into the chosen kernel's
layout, stashes it on the module (``module._kernel_weight``) and returns the forward.

The choice can be forced, for evaluation and tests, with :func:`set_backend` /
:func:`use_backend` or the environment variable ``QUANTKIT_BACKEND`` (``auto``, ``reference``,
``cpu``, ``triton``); :func:`set_backend` wins over the variable.  Modules keep the backend they
picked: call :func:`reset_backends` on a model after changing the setting.

CPU paths (see :mod:`quantkit.kernels.cpu`) compute in bf16 (about 2e-3 relative error per
matmul, far below 4-bit quantization noise), with one exception: float32 activations of at
least ``FP32_EXACT_MIN_TOKENS`` (16) positions per sequence -- prefill and perplexity windows --
are multiplied in float32 against the exactly dequantized weight (the native int4 kernel
dequantizes; every other CPU path hands those calls to the reference), so a float32 model's
perplexity on the CPU path equals the reference's.  Decode (one position per sequence, any
batch) stays on the bf16 paths, so a sequence decodes alike alone and in a batch.
quantkit's native int4 kernel takes float32 and bf16 activations alike; PyTorch's ops, its
fallback, want bf16 (float32 is cast around each call).

    >>> with use_backend("reference"):          # the oracle, whatever the device
    ...     reset_backends(model); y = model(x)   # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.kernels import cpu as cpu_kernels
from quantkit.kernels.triton_utils import interpreting

BACKENDS = ("auto", "reference", "cpu", "triton")
ENV_VAR = "QUANTKIT_BACKEND"

_forced: str | None = None  # set only through set_backend()


# ---- the setting ---------------------------------------------------------------------------
def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise QuantkitError(f"unknown backend {name!r} ({source}); use one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Force ``name`` for modules that choose their backend from now on; ``None`` clears the
    override (then ``QUANTKIT_BACKEND``, else ``auto``, applies)."""
    global _forced
    _forced = None if name is None else _check_name(name, "set_backend")


def backend_setting() -> str:
    """The setting in force: :func:`set_backend`'s, else ``$QUANTKIT_BACKEND``, else ``auto``."""
    if _forced is not None:
        return _forced
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")


@contextmanager
def use_backend(name: str | None):
    """``with use_backend("reference"): ...`` forces a backend inside the block."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(device: torch.device | str) -> str:
    """The path for tensors on ``device``: ``triton``, ``cpu`` or ``reference``."""
    device = torch.device(device)
    setting = backend_setting()
    if setting == "auto":
        if device.type == "cuda":
            return "triton" if _triton_available() else "reference"
        return "cpu" if device.type == "cpu" else "reference"
    if setting == "cpu" and device.type != "cpu":
        raise QuantkitError(f"backend 'cpu' was forced but the tensors are on {device}")
    if setting == "triton":
        if not _triton_available():
            raise QuantkitError("backend 'triton' was forced but Triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise QuantkitError(f"backend 'triton' needs a GPU (or TRITON_INTERPRET=1), the tensors are on {device}")
    return setting


# ---- QuantLinear forwards ------------------------------------------------------------------
def _add_bias(module, y: torch.Tensor) -> torch.Tensor:
    return y if module.bias is None else y + module.bias.to(y.dtype)


def reference_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Dequantize the whole weight, then a float matmul: slow, exact, the oracle."""
    w = module.dequantized_weight().to(x.dtype)
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return F.linear(x, w, bias)


def _float32_prefill(module, x: torch.Tensor) -> bool:
    """Float32 prefill (see :func:`quantkit.kernels.cpu.exact_float32`): computed in float32, exactly."""
    return cpu_kernels.exact_float32(x)


def _cpu_int4_forward(module, x):
    w = module._kernel_weight
    if isinstance(w, cpu_kernels.CpuInt4Weight) and _float32_prefill(module, x):
        return reference_forward(module, x)  # PyTorch's op computes in bf16 (the native kernel has its own exact path)
    return cpu_kernels.cpu_int4_matmul(x, w, module.bias)  # adds the bias itself


def _cpu_int8_forward(module, x):
    if _float32_prefill(module, x):
        return reference_forward(module, x)
    return _add_bias(module, cpu_kernels.cpu_int8_weight_matmul(x, module._kernel_weight))


def _dense_forward(module, x):
    if _float32_prefill(module, x):
        return reference_forward(module, x)  # the dense copy is bf16
    return _add_bias(module, cpu_kernels.dense_matmul(x, module._kernel_weight))


def _triton_w4a16_forward(module, x):
    from quantkit.kernels.w4a16 import w4a16_matmul

    return _add_bias(module, w4a16_matmul(x, module._kernel_weight))


def _triton_w8a16_forward(module, x):
    from quantkit.kernels.w8a16 import w8a16_matmul

    return _add_bias(module, w8a16_matmul(x, module._kernel_weight))


def _prepare_cpu(module) -> Callable:
    """Convert to the fastest CPU layout the format allows: int4 (<= 4 bits; quantkit's kernel,
    else PyTorch's op), int8 op (5-8 bits per channel), else a bf16 weight dequantized once."""
    q, s, z = module.codes(), module.scales.float(), module.zero_points()
    if module.bits <= 4:
        w = cpu_kernels.cpu_int4_weight(q, s, z, module.g_idx, module.group_size)
        if w is not None:
            module._kernel_weight = w
            return _cpu_int4_forward
    elif module.scales.shape[1] == 1:
        w = cpu_kernels.cpu_int8_weight(q, s, z, module.bits)
        if w is not None:
            module._kernel_weight = w
            return _cpu_int8_forward
    module._kernel_weight = cpu_kernels.dense_weight(q, s, z, module.group_map())
    return _dense_forward


def _prepare_triton(module) -> Callable:
    """4-bit: the packed words are reused as they are; 2/3-bit codes become nibbles with
    explicit zeros; 5-8 bit codes go to the W8A16 kernel."""
    from quantkit.kernels import layout

    if module.bits == 4:
        module._kernel_weight = layout.int4_weight_from_packed(
            module.qweight, module.scales, module.qzeros, module.g_idx, module.group_size, module.in_features)
        return _triton_w4a16_forward
    zeros = None if (module.bits == 8 and module.sym) else module.zero_points()  # W8A16's symmetric zero is 128
    make = layout.int4_weight_from_codes if module.bits < 4 else layout.int8_weight_from_codes
    module._kernel_weight = make(module.codes(), module.scales, zeros, module.g_idx, module.group_size)
    return _triton_w4a16_forward if module.bits < 4 else _triton_w8a16_forward


def select_backend(module, x: torch.Tensor) -> Callable:
    """Pick ``module``'s forward for inputs like ``x`` (called once, by ``QuantLinear.forward``)."""
    path = resolve_backend(x.device)
    if path == "cpu":
        return _prepare_cpu(module)
    if path == "triton":
        return _prepare_triton(module)
    module._kernel_weight = None
    return reference_forward


def reset_backends(model: nn.Module) -> int:
    """Forget every module's chosen backend and converted weight (after :func:`set_backend`
    or moving the model); returns how many modules were reset."""
    n = 0
    for m in model.modules():
        if hasattr(m, "_backend") and hasattr(m, "qweight"):
            m._backend = None
            m._kernel_weight = None
            n += 1
    return n


def kernel_weight_bytes(module) -> int:
    """Bytes the module's chosen path reads per matmul (its packed buffers before the first forward)."""
    w = getattr(module, "_kernel_weight", None)
    bias = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
    if w is None:
        return module.weight_bytes() + bias
    return w.nbytes() + bias


# ---- W8A8 (for Int8Linear) -----------------------------------------------------------------
def int8_matmul(x_int8: torch.Tensor, w_int8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.bfloat16, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 ``x_int8 [M, K] @ w_int8 [N, K]^T * x_scale [M] * w_scale [N] (+ bias) -> [M, N]``,
    on the path :func:`resolve_backend` picks for ``x_int8``'s device (CUDA: Triton, CPU:
    ``torch._int_mm``, else the reference)."""
    from quantkit.kernels import int8_matmul as kernel_int8_matmul

    return kernel_int8_matmul(x_int8, w_int8, x_scale, w_scale, out_dtype, bias, backend=resolve_backend(x_int8.device))
