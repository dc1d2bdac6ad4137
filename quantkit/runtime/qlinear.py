"""Quantized linear modules of the runtime.

``QuantLinear`` holds a weight in quantkit format v1 (see :mod:`quantkit.pack.bits`):

* ``qweight`` uint8 ``[out, ceil(in*bits/8)]``: codes packed densely per row;
* ``scales`` float16 ``[out, n_groups]``;
* ``qzeros`` uint8 ``[out, n_groups]``: integer zero points (asymmetric only; symmetric
  grids use ``2**(bits-1)``);
* ``g_idx`` int32 ``[in]``: column -> group (act-order only; otherwise ``k // group_size``).

``W[n, k] = (q[n, k] - z[n, g_idx[k]]) * s[n, g_idx[k]]``.

The matmul goes through :func:`quantkit.runtime.backends.select_backend`, which picks the
kernel path once from the device (CUDA -> Triton, CPU -> PyTorch's low-bit ops, else the
pure-torch reference).
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.core.quant import ACT_DEFAULTS, act_entry, dequantize, group_index, symmetric_zero
from quantkit.pack.bits import pack_bits, packed_row_bytes, unpack_bits
from quantkit.runtime.actquant import act_quant_forward


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool,
        bias: bool = False,
        act_order: bool = False,
        dtype: torch.dtype = torch.float32,
        act_bits: int | None = None,
        act_clip: float = 1.0,
        act_group_size: int = -1,
        act_sym: bool = True,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.sym, self.act_order = bits, sym, act_order
        self.act_bits = act_bits  # 8 or 4: activations quantized per token, integer matmuls (quantkit.runtime.actquant)
        self.act_clip = float(act_clip)  # each token's grid spans act_clip * max|x|
        self.act_group_size = act_group_size  # input columns per activation scale (-1: one per token)
        self.act_sym = act_sym  # symmetric activation grids, else a zero point per token (and group)
        self.group_size = in_features if group_size == -1 else group_size
        n_groups = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out_features, packed_row_bytes(in_features, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16))
        if not sym:
            self.register_buffer("qzeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        else:
            self.qzeros = None
        if act_order:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        else:
            self.g_idx = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._backend = None  # the forward chosen at the first call (quantkit.runtime.backends)
        self._kernel_weight = None  # the weight converted for it

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_codes(cls, q, scales, zeros, bits, group_size, sym, g_idx=None, bias=None, dtype=torch.float32, **activations):
        """Build from unpacked codes ``q [out, in]`` and float ``scales``/``zeros [out, n_groups]``;
        ``activations``: run-time activation settings (``act_bits=4``..., see ``ACT_DEFAULTS``)."""
        out_f, in_f = q.shape
        m = cls(in_f, out_f, bits, group_size, sym, bias is not None, g_idx is not None, dtype, **activations)
        m.qweight.copy_(pack_bits(q, bits))
        m.scales.copy_(scales.to(torch.float16))
        if not sym:
            m.qzeros.copy_(zeros.round().to(torch.uint8))
        if g_idx is not None:
            m.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            m.bias.data.copy_(bias.detach().to(dtype))
        return m

    @classmethod
    def from_entry(cls, in_features: int, out_features: int, entry: dict, bias: bool, dtype: torch.dtype):
        """An empty module for a ``quantization_config["modules"]`` entry (weights loaded after)."""
        return cls(in_features, out_features, int(entry["bits"]), int(entry["group_size"]), bool(entry["sym"]),
                   bias=bias, act_order=bool(entry.get("act_order")), dtype=dtype,
                   **{k: entry.get(k, d) for k, d in ACT_DEFAULTS.items()})

    def config_entry(self) -> dict:
        """This module's ``quantization_config["modules"]`` entry: what :meth:`from_entry` rebuilds it from."""
        return {"kind": "quant", "bits": self.bits, "group_size": -1 if self.group_size == self.in_features else self.group_size,
                "sym": self.sym, "act_order": self.act_order, **act_entry(self)}

    # ---- views --------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        return unpack_bits(self.qweight, self.bits, self.in_features)

    def zero_points(self) -> torch.Tensor:
        if self.qzeros is not None:
            return self.qzeros.float()
        return torch.full(self.scales.shape, float(symmetric_zero(self.bits)), device=self.scales.device)

    def group_map(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx
        return group_index(self.in_features, self.group_size).to(self.qweight.device)

    def dequantized_weight(self) -> torch.Tensor:
        """Float32 ``[out, in]`` weight (the reference every kernel is checked against)."""
        return dequantize(self.codes(), self.scales.float(), self.zero_points(), self.group_map())

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.qzeros, self.g_idx) if t is not None)

    # ---- compute ------------------------------------------------------------------
    def prepare(self, like: torch.Tensor) -> None:
        """Choose the kernel path for inputs like ``like`` (its device) and convert the weight for
        it, as the first forward does; nothing once chosen (until ``reset_backends``)."""
        if self._backend is None:
            from quantkit.runtime.backends import select_backend

            self._backend = select_backend(self, like)

    @property
    def kernel_weight(self):
        """The weight as the chosen kernel path reads it (e.g. a ``NativeInt4Weight`` on quantkit's
        CPU kernel); None before :meth:`prepare` / the first forward, or on the reference path.

            >>> m.prepare(x); m.kernel_weight     # doctest: +SKIP
        """
        return self._kernel_weight

    def _apply(self, fn, recurse=True):
        self._int_weight = None  # the integer weight (quantkit.runtime.actquant) follows the buffers
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            return act_quant_forward(self, x)
        if self._backend is None:
            self.prepare(x)
        return self._backend(self, x)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, "
            f"sym={self.sym}, act_order={self.act_order}" + (f", act_bits={self.act_bits}" if self.act_bits else "")
            + (f", act_clip={self.act_clip}" if self.act_bits and self.act_clip != 1.0 else "")
            + (f", act_group_size={self.act_group_size}" if self.act_bits and self.act_group_size != -1 else "")
            + (", act_sym=False" if self.act_bits and not self.act_sym else "")
        )


def bits_per_weight(model: nn.Module) -> float | None:
    """``8 x bytes / weights`` over the model's :class:`QuantLinear` modules (codes, scales, zeros
    and g_idx as stored: the measure ``--target-bpw`` budgets); None when it has none."""
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not mods:
        return None
    return 8 * sum(m.weight_bytes() for m in mods) / sum(m.in_features * m.out_features for m in mods)
