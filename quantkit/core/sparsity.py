"""Sparsity masks and the packed N:M format, written once for SparseGPT, Wanda and magnitude.

Conventions: a *mask* is a bool tensor shaped like the weight, ``True`` where the weight is
**pruned** (set to zero), as in the SparseGPT and Wanda reference code.  An ``N:M`` pattern
keeps at most ``N`` nonzeros in every run of ``M`` consecutive input columns of a row
(``2:4`` is 50% sparse, ``1:4`` 75%).

    >>> scores = torch.rand(4, 8)
    >>> mask = topk_mask(scores, 0.5)            # the 4 lowest scores of each row
    >>> mask = nm_mask(scores, 2, 4)             # the 2 lowest of each group of 4
    >>> assert nm_valid(torch.where(mask, 0.0, scores), 2, 4)
    >>> values, idx = nm_compress(torch.where(mask, 0.0, scores), 2, 4)
    >>> w = nm_decompress(values, idx, 2, 4)     # exactly the masked weight
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError, excerpt

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
MAX_M = 256  # in-group indices are stored in at most 8 bits


@dataclass(frozen=True)
class SparsityTarget:
    """What one linear is pruned to: a fraction (unstructured) or an ``N:M`` pattern."""

    sparsity: float
    nm: tuple[int, int] | None = None

    @classmethod
    def parse(cls, sparsity: float | None = None, pattern: str | None = None) -> "SparsityTarget":
        if sparsity is not None and pattern is not None:
            raise QuantkitError("give a sparsity or an N:M pattern, not both")
        if pattern is not None:
            n, m = parse_pattern(pattern)
            return cls(1 - n / m, (n, m))
        if sparsity is None:
            raise QuantkitError("give a sparsity or an N:M pattern")
        check_sparsity(sparsity)
        return cls(float(sparsity))

    def describe(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity:g}"

    def check_layer(self, name: str, in_features: int) -> None:
        """Refuse an N:M pattern whose group ``M`` does not divide the layer's input features."""
        if self.nm and in_features % self.nm[1]:
            raise QuantkitError(f"pattern {self.describe()}: M={self.nm[1]} does not divide {name}'s {in_features} "
                                f"input features (exclude it with an override, or pick M dividing {in_features})")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; refuses anything but ``0 < N < M <= 256``."""
    m = _PATTERN.match(str(pattern))
    if not m:
        raise QuantkitError(f"pattern must look like N:M (e.g. 2:4), got {excerpt(pattern)}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise QuantkitError(f"pattern N:M needs 0 < N < M (keep N of every M weights), got {excerpt(pattern)}")
    if mm > MAX_M:
        raise QuantkitError(f"pattern M must be at most {MAX_M}, got {excerpt(pattern)}")
    return n, mm


def check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise QuantkitError(f"sparsity must be a fraction in (0, 1), got {excerpt(sparsity)}")


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a sparsity prunes (floor, robust to float error: 0.5*576 = 288)."""
    return int(math.floor(numel * sparsity + 1e-9))


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune exactly the ``k`` lowest scores of the whole tensor (``topk`` breaks ties; a threshold would not)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.view(-1)[torch.topk(scores.reshape(-1), k, largest=False).indices] = True
    return mask


def topk_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Prune the lowest-scoring ``floor(sparsity * n)`` weights of each row (``per_row``, Wanda's
    per-output comparison) or of the whole ``[out, in]`` tensor (per layer)."""
    out_f, in_f = scores.shape
    if not per_row:
        return lowest_k_mask(scores, n_pruned(scores.numel(), sparsity))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    k = n_pruned(in_f, sparsity)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``m - n`` lowest scores of every group of ``m`` consecutive columns of a row."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise QuantkitError(f"N:M pattern {n}:{m}: {in_f} columns are not a multiple of {m}")
    s = scores.reshape(out_f, in_f // m, m)  # [out, in] -> [out, groups, m]
    mask = torch.zeros_like(s, dtype=torch.bool)
    mask.scatter_(2, torch.topk(s, m - n, dim=2, largest=False).indices, True)
    return mask.reshape(out_f, in_f)


def select_mask(scores: torch.Tensor, target: SparsityTarget, per_row: bool = True) -> torch.Tensor:
    """The mask for ``target``: N:M per group, else the lowest fraction per row or per tensor."""
    if target.nm is not None:
        return nm_mask(scores, *target.nm)
    return topk_mask(scores, target.sparsity, per_row)


def magnitude_prune(W: torch.Tensor, target: SparsityTarget) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(w_hat, mask True = pruned, sum of pruned w^2)``: the lowest |w| of the whole layer
    (unstructured, as the SparseGPT and Wanda papers' baseline) or of each N:M group.

        >>> w_hat, mask, _ = magnitude_prune(torch.randn(4, 8), SparsityTarget(0.5))
    """
    W = W.float()
    mask = select_mask(W.abs(), target, per_row=False)
    return W.masked_fill(mask, 0), mask, float(W[mask].pow(2).sum())


def nm_valid(w: torch.Tensor, n: int, m: int) -> bool:
    """Does every group of ``m`` consecutive columns of every row hold at most ``n`` nonzeros?"""
    out_f, in_f = w.shape
    if in_f % m:
        return False
    return bool(((w.reshape(out_f, in_f // m, m) != 0).sum(-1) <= n).all())


def index_bits(m: int) -> int:
    """Bits per stored in-group index (at least 2: the narrowest width the bit packer handles)."""
    return max(2, math.ceil(math.log2(m)))


def nm_compress(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept values and their in-group positions of an N:M-sparse ``w [out, in]``.

    Returns ``values [out, in/m*n]`` (``w``'s dtype) and ``indices [out, in/m*n]`` (uint8, each in
    ``[0, m)``, ascending within a group).  Lossless for any ``w`` with :func:`nm_valid`: a group
    with fewer than ``n`` nonzeros also stores some of its zeros.
    """
    if not nm_valid(w, n, m):
        raise QuantkitError(f"weight is not {n}:{m} sparse")
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // m, m)  # [out, in] -> [out, groups, m]
    idx = torch.topk((g != 0).to(torch.int8), n, dim=2, sorted=False).indices.sort(dim=2).values  # nonzeros first
    values = torch.gather(g, 2, idx)
    return values.reshape(out_f, -1).contiguous(), idx.reshape(out_f, -1).to(torch.uint8)


def nm_decompress(values: torch.Tensor, indices: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Inverse of :func:`nm_compress`: dense ``[out, in]`` with zeros in the pruned positions."""
    out_f = values.shape[0]
    groups = values.shape[1] // n
    w = torch.zeros(out_f, groups, m, dtype=values.dtype, device=values.device)
    w.scatter_(2, indices.reshape(out_f, groups, n).long(), values.reshape(out_f, groups, n))
    return w.reshape(out_f, groups * m)
