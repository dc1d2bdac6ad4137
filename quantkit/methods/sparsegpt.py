"""SparseGPT (Frantar & Alistarh, 2023): prune a layer in one shot by optimal-brain-surgeon
updates — each pruned weight's error is spread over the columns not yet processed, weighted by
the inverse Hessian of the layer's inputs — with the mask chosen adaptively per block of
columns, N:M patterns, and optional quantization of the kept weights in the same pass.

:func:`sparsegpt_prune` is the algorithm (tensors in, tensors out); :class:`SparseGPT` plugs it
into the block-wise driver with a Hessian per linear (the accumulator GPTQ uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantkit.core.types import QuantizedWeight
from quantkit.errors import QuantkitError
from quantkit.core.sparsity import magnitude_prune
from quantkit.methods.pruning import PruneConfig, PruneMethod
from quantkit.core.hessian import dead_columns, robust_inverse_cholesky
from quantkit.core.quant import QuantSpec, compute_qparams, dequantize, quantize_codes, quantize_rtn
from quantkit.core.sparsity import lowest_k_mask, n_pruned, nm_mask
from quantkit.methods.base import check_obs_settings
from quantkit.registry import register_method


@dataclass(frozen=True)
class SparseGPTConfig(PruneConfig):
    blocksize: int = field(default=128, metadata={
        "help": "SparseGPT adaptive-mask block size (columns per mask block and lazy batch update, sec. 3.2)."})
    damp: float = field(default=0.01, metadata={"help": "SparseGPT damping (fraction of mean diag H added to the diagonal)."})
    bits: int | None = field(default=None, metadata={
        "help": "SparseGPT: also quantize the kept weights in the same pass (sec. 3.4)."})  # None: stay float
    group_size: int = field(default=128, metadata={"help": "With --bits: input columns per scale; -1 = per channel."})
    sym: bool = field(default=True, metadata={"help": "With --bits: symmetric grid."})

    def __post_init__(self):
        super().__post_init__()
        check_obs_settings(self.damp, self.blocksize)
        if self.bits is not None:
            QuantSpec(self.bits, self.group_size, self.sym)  # validates
            if self.packed:
                raise QuantkitError("--packed stores float N:M weights; with --bits the checkpoint is packed by the quantizer")

    def spec_for(self, module_name: str) -> QuantSpec | None:
        return None if self.bits is None else QuantSpec(self.bits, self.group_size, self.sym)

    @property
    def quantizes(self) -> bool:
        return self.bits is not None


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                    blocksize: int = 128, percdamp: float = 0.01, spec: QuantSpec | None = None):
    """Prune ``W [out, in]`` given ``H [in, in]`` to ``sparsity`` (unstructured) or ``nm = (n, m)``
    (keep ``n`` of every ``m`` consecutive inputs), SparseGPT Algorithm 1.

    Unstructured: per block of ``blocksize`` columns, prune the weights with the lowest OBS
    saliency ``w^2 / [H^-1]_cc^2`` over the whole block (rows get different sparsities; the
    layer gets exactly ``floor(sparsity * out * in)``).  N:M: the same saliency decides within
    each group of ``m`` (``blocksize`` is rounded down to a multiple of ``m``).  With ``spec`` the
    kept weights are quantized in the same pass (GPTQ-style grids per group, computed when the
    group starts, pruned weights excluded); pruned weights stay exactly zero on any grid.

    Returns ``(w_hat [out, in], mask [out, in] True = pruned, QuantizedWeight | None, loss)``,
    or ``None`` when ``H`` stays singular after raising the damping.

        >>> w_hat, mask, _, loss = sparsegpt_prune(torch.randn(8, 16), torch.eye(16), sparsity=0.5, blocksize=8)
        >>> int(mask.sum())
        64
    """
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity and nm")
    W = W.float().clone()
    H = H.float().clone()
    out_f, in_f = W.shape
    if nm is not None:
        n, m = nm
        if in_f % m:
            raise QuantkitError(f"N:M pattern {n}:{m}: {in_f} input columns are not a multiple of {m}")
        blocksize = max(m, blocksize // m * m)

    dead = dead_columns(H)  # never excited: pruning them costs nothing, so they go first
    H[dead, dead] = 1
    Hinv, _ = robust_inverse_cholesky(H, percdamp)  # upper Cholesky factor of (H + damp I)^-1
    if Hinv is None:
        return None

    gs = spec.groups_for(in_f) if spec is not None else in_f
    scales = torch.zeros(out_f, in_f // gs, device=W.device)
    zeros = torch.zeros(out_f, in_f // gs, device=W.device)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device) if spec is not None else None
    if spec is not None and spec.group_size == -1:
        scales[:, 0], zeros[:, 0] = compute_qparams(W, spec)  # one grid per row, from the original weights

    mask = torch.zeros(out_f, in_f, dtype=torch.bool, device=W.device)
    Q = torch.zeros_like(W)
    losses = torch.zeros(out_f, device=W.device)
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = W[:, i1:i2].clone()  # [out, b]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1).unsqueeze(0)  # [1, b]
        if nm is None:
            # adaptive mask selection (sec. 3.2): the block's lowest saliencies, after the updates so far
            saliency = W1.pow(2) / d1.pow(2)
            saliency[:, dead[i1:i2]] = 0
            k = n_pruned(out_f * i2, sparsity) - n_pruned(out_f * i1, sparsity)  # exact total over the layer
            mask1 = lowest_k_mask(saliency, k)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % m == 0:
                saliency = W1[:, i:i + m].pow(2) / d1[:, i:i + m].pow(2)
                saliency[:, dead[col:col + m]] = 0
                mask1[:, i:i + m] = nm_mask(saliency, n, m)
            q = w.masked_fill(mask1[:, i], 0)
            if spec is not None:
                if spec.group_size != -1 and col % gs == 0:
                    # a new group starts: its grid from the current weights less the pruned ones (sec. 3.4)
                    cols = W1[:, i:i + gs].masked_fill(mask1[:, i:i + gs], 0)
                    if col + gs > i2:
                        cols = torch.cat([cols, W[:, i2:col + gs]], dim=1)
                    scales[:, col // gs], zeros[:, col // gs] = compute_qparams(cols, spec)
                s, z = scales[:, col // gs], zeros[:, col // gs]
                qc = quantize_codes(q, s, z, spec.maxq)  # a pruned 0 lands on code z: still exactly 0
                codes[:, col] = qc.to(torch.uint8)
                q = (qc - z) * s
            Q1[:, i] = q
            losses += (w - q).pow(2) / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # OBS update of the block (eq. 3)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the rest

    qw = None
    if spec is not None:
        qw = QuantizedWeight(codes, scales, zeros, spec)
        Q = dequantize(codes, scales, zeros, gs)
    return Q, mask, qw, float(losses.sum())


@register_method("sparsegpt", SparseGPTConfig)
class SparseGPT(PruneMethod):
    stats_kind = "hessian"

    def prune_linear(self, w, hessian, target, spec):
        cfg = self.config
        res = sparsegpt_prune(w, hessian.H, sparsity=None if target.nm else target.sparsity, nm=target.nm,
                              blocksize=cfg.blocksize, percdamp=cfg.damp, spec=spec)
        if res is not None:
            w_hat, mask, qw, loss = res
            return w_hat, mask, qw, loss, ""
        # singular Hessian even after damping: magnitude pruning (+ round-to-nearest), reported
        w_hat, mask, loss = magnitude_prune(w, target)
        qw = None
        if spec is not None:
            q, s, z = quantize_rtn(w_hat, spec)
            qw = QuantizedWeight(q, s, z, spec)
            w_hat = dequantize(q, s, z, spec.groups_for(w.shape[1]))
        return w_hat, mask, qw, loss, "Hessian not positive definite after damping: fell back to magnitude pruning"
