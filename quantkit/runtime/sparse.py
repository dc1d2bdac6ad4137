"""N:M sparse linear of the runtime (checkpoint kind ``"nm_sparse"``).

``SparseLinear`` holds an N:M-sparse weight as

* ``values`` ``[out, in/m*n]`` (the model's float dtype): the kept weights, group by group;
* ``indices`` uint8 ``[out, ceil(in/m*n*b/8)]``: each kept weight's position inside its group
  of ``m`` columns, ``b = max(2, ceil(log2 m))`` bits each, packed with
  :func:`quantkit.pack.bits.pack_bits` (2:4 and 4:8 -> 2 and 3 bits per kept weight).

``W[r, g*m + indices[r, g*n + j]] = values[r, g*n + j]``; every other weight is zero.  The
forward scatters the weight back to dense and calls ``F.linear`` (the reference path; a
sparse kernel would dispatch here on the device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.core.sparsity import index_bits, nm_compress, nm_decompress
from quantkit.pack.bits import pack_bits, packed_row_bytes, unpack_bits


class SparseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, n: int, m: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if in_features % m:
            raise ValueError(f"in_features {in_features} is not a multiple of M={m}")
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        kept = in_features // m * n
        self.register_buffer("values", torch.zeros(out_features, kept, dtype=dtype))
        self.register_buffer("indices", torch.zeros(out_features, packed_row_bytes(kept, index_bits(m)), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_compressed(cls, values: torch.Tensor, indices: torch.Tensor, n: int, m: int, bias=None,
                        dtype: torch.dtype = torch.float32) -> "SparseLinear":
        """From ``values``/``indices [out, in/m*n]`` as :func:`~quantkit.core.sparsity.nm_compress` gives."""
        out_f, kept = values.shape
        mod = cls(kept // n * m, out_f, n, m, bias is not None, dtype)
        mod.values.copy_(values.to(dtype))
        mod.indices.copy_(pack_bits(indices, index_bits(m)))
        if bias is not None:
            mod.bias.data.copy_(bias.detach().to(dtype))
        return mod

    @classmethod
    def from_dense(cls, w: torch.Tensor, n: int, m: int, bias=None, dtype: torch.dtype | None = None) -> "SparseLinear":
        """From an N:M-sparse dense weight ``[out, in]`` (refused if any group holds more than ``n`` nonzeros)."""
        values, indices = nm_compress(w, n, m)
        return cls.from_compressed(values, indices, n, m, bias, dtype or w.dtype)

    @classmethod
    def from_entry(cls, in_features: int, out_features: int, entry: dict, bias: bool, dtype: torch.dtype):
        """An empty module for a ``quantization_config["modules"]`` entry (weights loaded after)."""
        return cls(in_features, out_features, int(entry["n"]), int(entry["m"]), bias=bias, dtype=dtype)

    # ---- views --------------------------------------------------------------------
    def group_indices(self) -> torch.Tensor:
        """Unpacked in-group positions ``[out, in/m*n]`` (uint8)."""
        return unpack_bits(self.indices, index_bits(self.m), self.values.shape[1])

    def dense_weight(self) -> torch.Tensor:
        """The weight ``[out, in]`` with its zeros, in the stored dtype."""
        return nm_decompress(self.values, self.group_indices(), self.n, self.m)

    def weight_bytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.indices.numel()

    # ---- compute ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense_weight()
        return F.linear(x.to(w.dtype), w, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, pattern={self.n}:{self.m}, dtype={self.values.dtype}"
