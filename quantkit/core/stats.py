"""Per-input-channel activation statistics, collected once for AWQ, SmoothQuant and Wanda."""

from __future__ import annotations

import torch


class ActStats:
    """Running per-channel ``mean |x|``, ``max |x|`` and ``sum x^2`` over tokens (``[in]`` each)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.abs_max = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [..., in] -> [tokens, in]
        a = x.abs()
        self.abs_sum += a.sum(0).double()
        self.abs_max = torch.maximum(self.abs_max, a.amax(0))
        self.sq_sum += x.pow(2).sum(0).double()
        self.n += x.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    @property
    def l2_norm(self) -> torch.Tensor:
        """Column norm ``||X_j||_2`` over all tokens (Wanda's activation term)."""
        return self.sq_sum.sqrt().float()
