"""``Int8Linear``: W8A8 linears (SmoothQuant), computed as a real int8 x int8 -> int32 matmul.

Checkpoint layout (module kind ``"w8a8"``):

* ``qweight`` int8 ``[out, in]``: per-output-channel symmetric codes, ``W ~= qweight * w_scales[:, None]``;
* ``w_scales`` float32 ``[out]``;
* ``act_scale`` float32 ``[1]``: the static per-tensor input scale (only with ``"act": "static"``;
  otherwise each token is quantized with its own scale ``max|x_t| / 127`` at run time);
* ``bias`` in the model's dtype.

Forward: ``x -> (x_int8 [M, K], x_scale [M])``, then
:func:`quantkit.runtime.backends.int8_matmul` (Triton on CUDA, ``torch._int_mm`` on CPU, an
exact int64 reference elsewhere), which accumulates in int32 and rescales by
``x_scale[m] * w_scales[n]``.  No path dequantizes the weight to float.

    >>> lin = Int8Linear.from_quantized(q, w_scale, act_scale=None, bias=None)
    >>> y = lin(x)          # x [..., in] float -> y [..., out] in x's dtype
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.core.quant import quantize_tokens


QMAX = 127


def quantize_activations(x: torch.Tensor, static_scale: torch.Tensor | None = None,
                         qmax: int = QMAX, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer activations in int8 storage: ``x [M, K]`` float -> ``(x_int [M, K],
    scale [M] float32)``, codes in ``[-qmax, qmax]`` (127 for int8, 7 for int4).

    Dynamic (``static_scale`` None): one scale per token (row), ``clip * max|x_m| / qmax`` (values
    beyond ``clip * max`` saturate).  Static: the calibrated per-tensor scale for every row (values
    beyond its range saturate at +-qmax)."""
    if static_scale is None:
        q, scale, _ = quantize_tokens(x, (qmax + 1).bit_length(), clip)  # qmax = 2^(bits-1) - 1
        return q, scale.reshape(-1)
    x = x.float()
    scale = static_scale.float().reshape(1).expand(x.shape[0]).contiguous()
    q = torch.clamp(torch.round(x / scale.unsqueeze(1)), -qmax, qmax).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, static: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scales", torch.ones(out_features, dtype=torch.float32))
        if static:
            self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32))
        else:
            self.act_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, q: torch.Tensor, w_scale: torch.Tensor, act_scale: float | None = None,
                       bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> "Int8Linear":
        """From int8 codes ``q [out, in]``, ``w_scale [out]`` and an optional static input scale."""
        out_f, in_f = q.shape
        m = cls(in_f, out_f, bias is not None, act_scale is not None, dtype)
        m.qweight.copy_(q.to(torch.int8))
        m.w_scales.copy_(w_scale.float().reshape(-1))
        if act_scale is not None:
            m.act_scale.fill_(float(act_scale))
        if bias is not None:
            m.bias.data.copy_(bias.detach().to(dtype))
        return m

    @classmethod
    def from_entry(cls, in_features: int, out_features: int, entry: dict, bias: bool, dtype: torch.dtype) -> "Int8Linear":
        """An empty module for a ``quantization_config["modules"]`` entry (weights loaded after)."""
        return cls(in_features, out_features, bias, entry.get("act", "dynamic") == "static", dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """Float32 ``[out, in]`` (for inspection and tests; the forward never uses it)."""
        return self.qweight.float() * self.w_scales.unsqueeze(1)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.w_scales, self.act_scale) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from quantkit.runtime.backends import int8_matmul  # dispatches on the device (Triton / torch._int_mm / reference)

        lead = x.shape[:-1]
        x_q, x_scale = quantize_activations(x.reshape(-1, self.in_features), self.act_scale)  # [M, K] int8, [M]
        y = int8_matmul(x_q, self.qweight, x_scale, self.w_scales, out_dtype=x.dtype, bias=self.bias)  # [M, N]
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        act = "static" if self.act_scale is not None else "dynamic per-token"
        return f"in={self.in_features}, out={self.out_features}, w8a8 (weights per-channel, activations {act})"
