"""Function-preserving weight transforms, written once for AWQ and SmoothQuant (and any later
rotation or smoothing method).

Scaling: for a group of linears that read the same input ``x`` (see :class:`quantkit.models.arch.LinearGroup`),
``W x = (W diag(s)) (diag(s)^-1 x)``.  The ``1/s`` is folded into whatever produces ``x``:

* an RMSNorm (``y = n(x) * (offset + w)``): ``w <- (offset + w) / s - offset`` (Gemma's ``1 + w``
  through :attr:`quantkit.models.arch.ArchSpec.norm_offset`);
* a LayerNorm (``y = n(x) * w + b``): ``w <- w / s``, ``b <- b / s``;
* a linear (``y = W_p h + b_p``): output rows ``W_p[j] <- W_p[j] / s_j``, ``b_p[j] <- b_p[j] / s_j``;

and ``s`` into the input columns of every linear of the group (``W[:, j] <- W[:, j] * s_j``).
A search (``quantkit.methods.awq``, ``quantkit.methods.smoothquant``) returns :class:`ScaleResult`
objects keyed by module names; :func:`fold_scales` applies one to any module tree (a decoder block
or the whole model, the names being relative to it).

Clipping: :class:`ClipResult` holds a per-(row, group) magnitude bound; :func:`apply_clip` clamps
a linear's weight to it.

    >>> res = ScaleResult("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj"), s)
    >>> fold_scales(block, res)            # the block computes the same function, up to rounding
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantkit.core.rotation import online_transforms
from quantkit.models.arch import LinearGroup, get_module, weight_out_in
from quantkit.errors import QuantkitError

FOLDABLE_KINDS = ("norm", "layernorm", "linear")


@dataclass
class ScaleResult:
    """Per-input-channel scales ``s [in]`` for ``linears``, whose ``1/s`` goes into ``prev_op``.

    ``alpha`` and ``loss`` record how the search chose ``s`` (for logs; not used to apply it)."""

    prev_op: str
    prev_kind: str
    linears: tuple[str, ...]
    scales: torch.Tensor  # [in] float32
    alpha: float | None = None
    loss: float | None = None

    def prefixed(self, prefix: str) -> "ScaleResult":
        """The same result with module names under ``prefix`` (block-relative -> model-relative)."""
        p = f"{prefix}." if prefix else ""
        return ScaleResult(p + self.prev_op, self.prev_kind, tuple(p + n for n in self.linears), self.scales,
                           self.alpha, self.loss)

    def to_dict(self) -> dict:
        return {"prev_op": self.prev_op, "prev_kind": self.prev_kind, "linears": list(self.linears),
                "scales": self.scales.tolist(), "alpha": self.alpha, "loss": self.loss}


@dataclass
class ClipResult:
    """Clip ``module``'s weight to ``[-max_val, max_val]`` per (output row, group of ``group_size`` columns)."""

    module: str
    max_val: torch.Tensor  # [out, n_groups]
    group_size: int

    def prefixed(self, prefix: str) -> "ClipResult":
        return ClipResult(f"{prefix}.{self.module}" if prefix else self.module, self.max_val, self.group_size)


def _in_features(mod: nn.Module, transposed: bool) -> int:
    return weight_out_in(mod, transposed).shape[1]


def _out_features(mod: nn.Module, transposed: bool) -> int:
    return weight_out_in(mod, transposed).shape[0]


def fold_blocker(root: nn.Module, group: LinearGroup, transposed: bool = False) -> str | None:
    """Why ``group``'s scales cannot be folded into ``root`` (``None`` if they can).

    A group fed by nothing foldable, or by a linear whose outputs are not the group's inputs
    one-to-one (grouped-query attention's ``v_proj -> o_proj``: each value head feeds several
    query heads), keeps its weights unscaled."""
    if group.prev is None or group.prev_kind not in FOLDABLE_KINDS:
        return "no foldable module feeds it"
    if any(online_transforms(get_module(root, n)) for n in group.linears):
        return "its input is rotated online, by a Hadamard transform after the module feeding it"
    in_f = _in_features(get_module(root, group.linears[0]), transposed)
    prev = get_module(root, group.prev)
    if group.prev_kind == "linear":
        out_f = _out_features(prev, transposed)
        if out_f != in_f:
            return f"{group.prev} has {out_f} outputs for {in_f} inputs (grouped-query attention?)"
    elif getattr(prev, "weight", None) is None or prev.weight.numel() != in_f:
        return f"{group.prev} has no per-channel weight of size {in_f}"
    return None


@torch.no_grad()
def fold_scales(root: nn.Module, res: ScaleResult, *, transposed: bool = False, norm_offset: float = 0.0) -> None:
    """Fold ``res`` into ``root`` in place: ``prev_op`` outputs divided by ``s``, the linears'
    input columns multiplied by ``s``.  Arithmetic in float64, stored in each parameter's dtype."""
    s = res.scales.detach().double().flatten()  # [in]
    if not torch.all(torch.isfinite(s)) or torch.any(s <= 0):
        raise QuantkitError(f"scales for {res.prev_op} must be finite and positive")
    prev = get_module(root, res.prev_op)
    if res.prev_kind == "linear":
        w = weight_out_in(prev, transposed)  # [out_prev, in_prev]
        if w.shape[0] != s.numel():
            raise QuantkitError(f"cannot fold {s.numel()} scales into the {w.shape[0]} outputs of {res.prev_op}")
        w.copy_((w.double() / s.to(w.device).unsqueeze(1)).to(w.dtype))
    elif res.prev_kind in ("norm", "layernorm"):
        w = prev.weight.data
        if w.numel() != s.numel():
            raise QuantkitError(f"cannot fold {s.numel()} scales into {res.prev_op}'s {w.numel()} weights")
        s_ = s.to(w.device).reshape(w.shape)
        w.copy_(((w.double() + norm_offset) / s_ - norm_offset).to(w.dtype))
    else:
        raise QuantkitError(f"cannot fold scales into {res.prev_op} of kind {res.prev_kind!r}")
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.data.copy_((bias.data.double() / s.to(bias.device)).to(bias.dtype))
    for name in res.linears:
        w = weight_out_in(get_module(root, name), transposed)  # [out, in]
        if w.shape[1] != s.numel():
            raise QuantkitError(f"cannot scale {name}'s {w.shape[1]} input columns by {s.numel()} scales")
        w.copy_((w.double() * s.to(w.device).unsqueeze(0)).to(w.dtype))


def clip_weight(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w [out, in]`` clamped to ``[-max_val, max_val]`` per group (``max_val [out, in // group_size]``)."""
    out_f, in_f = w.shape
    wg = w.reshape(out_f, in_f // group_size, group_size)  # [out, in] -> [out, n_groups, group]
    m = max_val.to(w.dtype).unsqueeze(-1)
    return torch.maximum(torch.minimum(wg, m), -m).reshape(out_f, in_f)


@torch.no_grad()
def apply_clip(root: nn.Module, res: ClipResult, *, transposed: bool = False) -> None:
    """Clamp ``res.module``'s weight in place (see :func:`clip_weight`)."""
    w = weight_out_in(get_module(root, res.module), transposed)
    w.copy_(clip_weight(w.float(), res.max_val.float(), res.group_size).to(w.dtype))
