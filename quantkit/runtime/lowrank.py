"""Low-rank linear of the runtime (checkpoint kind ``"lowrank"``).

``LowRankLinear`` computes ``y = (x @ u^T) @ v^T + bias``, i.e. ``W ~= v @ u``, with

* ``u`` ``[rank, in]`` (the model's float dtype): applied first;
* ``v`` ``[out, rank]``;
* ``bias`` ``[out]`` (if the original linear had one).

The checkpoint's ``quantization_config["modules"][name]`` is ``{"kind": "lowrank", "rank": r}``.
Both factors are ``nn.Parameter``: distillation (:mod:`quantkit.distill`) trains them directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn



class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} out of range for a {out_features}x{in_features} layer")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.u = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype))
        self.v = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "LowRankLinear":
        """From ``u [rank, in]`` and ``v [out, rank]`` (copied), so that ``W ~= v @ u``."""
        rank, in_f = u.shape
        out_f, rank_v = v.shape
        if rank_v != rank:
            raise ValueError(f"factor shapes do not chain: u {tuple(u.shape)}, v {tuple(v.shape)}")
        dtype = dtype or u.dtype
        mod = cls(in_f, out_f, rank, bias is not None, dtype)
        with torch.no_grad():
            mod.u.copy_(u.to(dtype))
            mod.v.copy_(v.to(dtype))
            if bias is not None:
                mod.bias.copy_(bias.detach().to(dtype))
        return mod

    @classmethod
    def from_entry(cls, in_features: int, out_features: int, entry: dict, bias: bool, dtype: torch.dtype):
        """An empty module for a ``quantization_config["modules"]`` entry (weights loaded after)."""
        return cls(in_features, out_features, int(entry["rank"]), bias=bias, dtype=dtype)

    # ---- views --------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The dense product ``v @ u`` ``[out, in]`` — a read-only view for code that asks a
        linear for its weight's dtype or shape; writing into it changes nothing."""
        with torch.no_grad():
            return self.v @ self.u

    def num_params(self) -> int:
        return self.u.numel() + self.v.numel() + (self.bias.numel() if self.bias is not None else 0)

    # ---- compute ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x.to(self.u.dtype), self.u)  # [..., in] -> [..., rank]
        return F.linear(h, self.v, self.bias).to(x.dtype)  # [..., rank] -> [..., out]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, dtype={self.u.dtype}"
