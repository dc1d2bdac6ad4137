"""Uniform integer quantization of weights, written once for every method.

The grid: ``w ~= (q - z) * s`` with integer codes ``q`` in ``[0, 2**bits)``, one scale ``s``
and integer zero point ``z`` per (output row, group of input columns).  Symmetric grids fix
``z = 2**(bits-1)`` (GPTQ's convention), so they need no stored zeros.

Example:
    >>> spec = QuantSpec(bits=4, group_size=64)
    >>> w = torch.randn(8, 128)
    >>> q, s, z = quantize_rtn(w, spec)
    >>> w_hat = dequantize(q, s, z, spec.group_size)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError, excerpt


@dataclass(frozen=True)
class QuantSpec:
    """A weight format: ``bits`` per weight, ``group_size`` input columns per scale
    (``-1`` means one group per output row, i.e. per-channel), symmetric or not."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    observer: str = "minmax"  # how each group's grid is chosen: see compute_qparams (not part of the stored format)

    def __post_init__(self):
        if self.observer not in OBSERVERS:
            raise QuantkitError(f"observer must be one of {', '.join(OBSERVERS)}, got {excerpt(self.observer)}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise QuantkitError(f"bits must be an integer from 2 to 8, got {excerpt(self.bits)}")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise QuantkitError(f"group size must be -1 (per-channel) or a positive integer, got {excerpt(self.group_size)}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups_for(self, in_features: int) -> int:
        """Group size actually used for a layer with ``in_features`` input columns."""
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, name: str, in_features: int) -> None:
        """Refuse a layer whose input features the group size does not divide."""
        g = self.groups_for(in_features)
        if in_features % g:
            good = [d for d in (16, 32, 64, 128, 256) if in_features % d == 0] + [-1]
            raise QuantkitError(
                f"group size {g} does not divide {name}'s {in_features} input features; "
                f"group sizes that work: {', '.join(map(str, good))}"
            )


OBSERVERS = ("minmax", "mse", "imatrix-mse")
# the "mse" observer: the grid's range shrunk by 1, 0.99, ... MSE_SHRINK_MIN, keeping per group the
# one with the least sum |w - Q(w)|^MSE_NORM (GPTQ's reference `--mse` search, there with 0.2 and 2.4);
# "imatrix-mse" weighs each column's term by its input's importance (mean x^2: llama.cpp's imatrix,
# llm-compressor's imatrix observer), which a method with calibration statistics passes
MSE_SHRINK_STEPS, MSE_SHRINK_MIN, MSE_NORM = 100, 0.5, 2.4
FP16_MAX = 65504.0  # the largest float16: scales are stored in float16, so none can exceed it


# A linear's run-time activation settings (W4A8, W4A4), named alike in configs, results, runtime
# modules and checkpoint entries; an entry lists the ones that differ from these defaults.
ACT_DEFAULTS = {"act_bits": None, "act_clip": 1.0, "act_group_size": -1, "act_sym": True}


def act_entry(obj) -> dict:
    """The activation settings a checkpoint's module entry records for ``obj`` (anything with the
    :data:`ACT_DEFAULTS` attributes): ``act_bits`` and the others that differ from their default,
    or nothing for weight-only modules."""
    if not obj.act_bits:
        return {}
    return {k: getattr(obj, k) for k, d in ACT_DEFAULTS.items() if k == "act_bits" or getattr(obj, k) != d}


def activation_problem(act_bits=None, act_clip=1.0, act_group_size=-1, act_sym=True, in_features: int | None = None) -> str:
    """What is wrong with activation settings (see :data:`ACT_DEFAULTS`), or ``""``: ``act_bits``
    8 or 4 (or None), ``act_clip`` in (0, 1], ``act_group_size`` -1 (one scale per token) or a
    positive number of columns (dividing ``in_features`` when given), ``act_sym`` a bool."""
    if act_bits is not None and (type(act_bits) is not int or act_bits not in (4, 8)):
        return f"act_bits must be 8 or 4 (or unset), got {excerpt(act_bits)}"
    if isinstance(act_clip, bool) or not isinstance(act_clip, (int, float)) or not 0 < act_clip <= 1:
        return f"act_clip must be in (0, 1], got {excerpt(act_clip)}"
    if type(act_group_size) is not int or (act_group_size != -1 and act_group_size < 1):
        return f"act_group_size must be -1 (one scale per token) or a positive number of columns, got {excerpt(act_group_size)}"
    if in_features is not None and act_group_size != -1 and in_features % act_group_size:
        return f"act_group_size {act_group_size} does not divide the layer's {in_features} input features"
    if type(act_sym) is not bool:
        return f"act_sym must be true or false, got {excerpt(act_sym)}"
    return ""


def quantize_tokens(x: torch.Tensor, bits: int, clip: float = 1.0, group_size: int = -1,
                    sym: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x [M, K]`` -> ``(x_int [M, K] int8, scale [M, G], offset [M, G] or None)`` with
    ``x ~= scale * (x_int + offset)`` over each token's groups of ``group_size`` columns (G = 1:
    the whole row).  Symmetric: codes in ``[-qmax, qmax]`` (``qmax = 2^(bits-1) - 1``), scale
    ``clip * max|x| / qmax`` (values beyond it saturate), no
    offset.  Asymmetric: ``2^bits`` levels over ``clip * [min(x, 0), max(x, 0)]``, codes stored shifted by
    ``-2^(bits-1)`` into int8, the zero point folded into the integer ``offset``."""
    m, k = x.shape
    g = k if group_size == -1 else group_size
    xg = x.float().reshape(m * (k // g), g)  # [M, K] -> [M * G, group]
    if sym:
        qmax = 2 ** (bits - 1) - 1
        scale = (xg.abs().amax(dim=1) * clip / qmax).clamp(min=1e-8)  # [M * G]
        q = torch.clamp(torch.round(xg / scale.unsqueeze(1)), -qmax, qmax).to(torch.int8)
        return q.reshape(m, k), scale.reshape(m, -1), None
    levels, half = 2 ** bits - 1, 2 ** (bits - 1)
    lo, hi = xg.amin(1).clamp(max=0) * clip, xg.amax(1).clamp(min=0) * clip  # the grid holds 0, as the weights' do
    scale = ((hi - lo) / levels).clamp(min=1e-8)
    zero = torch.round(-lo / scale)  # [M * G]: the code of 0
    q = torch.clamp(torch.round(xg / scale.unsqueeze(1)) + zero.unsqueeze(1), 0, levels) - half
    return q.to(torch.int8).reshape(m, k), scale.reshape(m, -1), (half - zero).reshape(m, -1)


def fake_quantize_tokens(x: torch.Tensor, bits: int, clip: float = 1.0, group_size: int = -1, sym: bool = True) -> torch.Tensor:
    """``x [M, K]`` through :func:`quantize_tokens` and back (float32): what the integer path computes with."""
    q, scale, offset = quantize_tokens(x, bits, clip, group_size, sym)
    m, k = q.shape
    xq = q.float().reshape(m, scale.shape[1], -1)
    if offset is not None:
        xq = xq + offset.unsqueeze(-1)
    return (xq * scale.unsqueeze(-1)).reshape(m, k)


def symmetric_zero(bits: int) -> int:
    """The zero point of a symmetric ``bits``-bit grid, ``2**(bits-1)`` (GPTQ's convention): stored
    nowhere, so every reader of a symmetric grid (runtime, kernels, references) takes it from here."""
    return 1 << (bits - 1)


def compute_qparams(w: torch.Tensor, spec: QuantSpec,
                    importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero for each row of ``w`` (``[rows, cols]`` -> ``[rows]``, ``[rows]``):
    from the row's min and max (``observer="minmax"``), or (``"mse"``) from that range shrunk by the
    factor, down to :data:`MSE_SHRINK_MIN`, whose grid rounds the row with the least error; with
    ``"imatrix-mse"`` each column's error counts ``importance[col]`` times (``[cols]``, e.g. the
    mean squared input of that column; None: every column alike, i.e. ``"mse"``)."""
    w = w.float()
    weight = 1.0
    if spec.observer == "imatrix-mse" and importance is not None:
        weight = importance.float().reshape(1, -1).clamp(min=0)
        weight = weight / weight.mean().clamp(min=1e-30)  # only the relative importance matters
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    if spec.observer == "minmax":
        return _grid(xmin, xmax, spec)
    best = _grid(xmin, xmax, spec)
    best_err = ((fake_quantize(w, best[0].unsqueeze(1), best[1].unsqueeze(1), spec.maxq) - w).abs().pow(MSE_NORM)
                * weight).sum(1)
    for i in range(1, int(round((1 - MSE_SHRINK_MIN) * MSE_SHRINK_STEPS)) + 1):
        p = 1 - i / MSE_SHRINK_STEPS
        scale, zero = _grid(p * xmin, p * xmax, spec)
        err = ((fake_quantize(w, scale.unsqueeze(1), zero.unsqueeze(1), spec.maxq) - w).abs().pow(MSE_NORM) * weight).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
    return best


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid spanning ``[xmin, xmax]`` per row (``xmin <= 0 <= xmax``), scales on float16's grid."""
    maxq = spec.maxq
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * xmax / maxq
        zero = torch.full_like(scale, symmetric_zero(spec.bits))
    else:
        scale = (xmax - xmin) / maxq
        zero = None
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    # checkpoints store scales in float16: put them on that grid now, so the in-memory model
    # and the packed checkpoint compute with the same numbers
    # (a scale clamped at FP16_MAX clips its group's largest weights: clipped_scale_note says so)
    scale = scale.clamp(6e-8, FP16_MAX).to(torch.float16).float()
    if zero is None:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def clipped_scale_note(scales: torch.Tensor) -> str:
    """A note for the log when ``scales`` hold groups clamped at :data:`FP16_MAX`: their weights
    are too large for a float16 scale, so the grid cannot reach the largest of them, which are
    clipped (a weight of 1e6 on a 4-bit symmetric grid is stored as 7 * 65504 = 458528); else ``""``."""
    n = int((scales >= FP16_MAX).sum())
    if not n:
        return ""
    return (f"weights beyond float16's scale range: {n} group scale(s) clamped at {FP16_MAX:g}, "
            "their largest weights clipped (a recipe's ignore: keeps the module in float)")


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes for ``w`` on the grid (scale, zero); scale/zero broadcast against ``w``."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Quantize then dequantize (float in, float out)."""
    return (quantize_codes(w, scale, zero, maxq) - zero) * scale


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """Default column -> group map ``[in]`` (no act-order)."""
    return torch.arange(in_features, dtype=torch.int32) // group_size


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | int) -> torch.Tensor:
    """Float weight ``[out, in]`` from codes ``q [out, in]``, ``scales``/``zeros [out, n_groups]``.

    ``g_idx`` is either the column -> group map ``[in]`` or a plain group size.
    """
    if isinstance(g_idx, int):
        g_idx = group_index(q.shape[1], g_idx)
    g = g_idx.long()
    return (q.float() - zeros.float()[:, g]) * scales.float()[:, g]


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: codes ``[out, in]`` (uint8), scales and zeros ``[out, n_groups]``."""
    out_f, in_f = w.shape
    g = spec.groups_for(in_f)
    wg = w.float().reshape(out_f, in_f // g, g)  # [out, in] -> [out, n_groups, group]
    scale, zero = compute_qparams(wg.reshape(-1, g), spec)
    scale = scale.reshape(out_f, -1)
    zero = zero.reshape(out_f, -1)
    q = quantize_codes(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.maxq).reshape(out_f, in_f)
    return q.to(torch.uint8), scale, zero


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    ref = ref.float()
    noise = (ref - approx.float()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-30)))
