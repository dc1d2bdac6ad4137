"""What compression produces, as plain data: per-linear results (:class:`QuantizedWeight`,
:class:`W8A8Weight`, :class:`NMSparseWeight`, :class:`LowRankWeight`), the per-module log and the
run's :class:`CompressionResult`.

Each result has a ``kind`` and ``config_entry()`` (its line in ``quantization_config["modules"]``);
none of them knows its runtime module: :mod:`quantkit.runtime.swap` has the one table from result
type to module, and :mod:`quantkit.runtime.modules` the one from ``kind`` to module when loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantkit.core.quant import ACT_DEFAULTS, QuantSpec, act_entry
from quantkit.core.sparsity import nm_compress


@dataclass
class QuantizedWeight:
    """What a quantizing method returns for one linear: unpacked codes and grid (no kernel layout)."""

    q: torch.Tensor  # [out, in] uint8 codes
    scales: torch.Tensor  # [out, n_groups]
    zeros: torch.Tensor  # [out, n_groups] integer-valued
    spec: QuantSpec
    g_idx: torch.Tensor | None = None  # [in] column -> group, act-order only
    act_bits: int | None = None  # activations quantized per token at run time (W4A8: 8), None: float
    act_clip: float = 1.0  # with act_bits: each token's range is this fraction of its max |x| (QuaRot clips A4 at 0.9)
    act_group_size: int = -1  # with act_bits: input columns per activation scale, -1: one per token
    act_sym: bool = True  # with act_bits: symmetric activation grids (False: a zero point per token and group)

    kind = "quant"  # the runtime module kind that loads it (see quantkit.runtime.modules)

    def config_entry(self) -> dict:
        """This module's entry in ``quantization_config["modules"]``."""
        entry = {"kind": self.kind, "bits": self.spec.bits, "group_size": self.spec.group_size, "sym": self.spec.sym,
                 "act_order": self.g_idx is not None}
        return {**entry, **act_entry(self)}

    def activations(self) -> dict:
        """The run-time activation settings, keyed as :data:`quantkit.core.quant.ACT_DEFAULTS`."""
        return {k: getattr(self, k) for k in ACT_DEFAULTS}


@dataclass
class W8A8Weight:
    """One linear's W8A8 result: int8 codes, per-channel weight scales, optional static input scale."""

    q: torch.Tensor  # [out, in] int8
    w_scale: torch.Tensor  # [out] float32
    act_scale: float | None = None  # static per-tensor input scale; None = dynamic per token

    kind = "w8a8"

    def config_entry(self) -> dict:
        return {"kind": self.kind, "bits": 8, "group_size": -1, "sym": True,
                "act": "dynamic" if self.act_scale is None else "static"}

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.w_scale.float().unsqueeze(1)  # [out, in]


@dataclass
class NMSparseWeight:
    """What a pruning method returns for one N:M linear when a packed checkpoint is asked for."""

    values: torch.Tensor  # [out, in/m*n] kept weights
    indices: torch.Tensor  # [out, in/m*n] uint8 in-group positions
    n: int
    m: int

    kind = "nm_sparse"  # the runtime module kind that loads it (see quantkit.runtime.sparse)

    @classmethod
    def from_dense(cls, w: torch.Tensor, n: int, m: int) -> "NMSparseWeight":
        values, indices = nm_compress(w, n, m)
        return cls(values, indices, n, m)

    def config_entry(self) -> dict:
        return {"kind": self.kind, "n": self.n, "m": self.m}


@dataclass
class LowRankWeight:
    """What a low-rank method returns for one linear: ``W ~= v @ u``."""

    u: torch.Tensor  # [rank, in]
    v: torch.Tensor  # [out, rank]

    kind = "lowrank"  # the runtime module kind that loads it (see quantkit.runtime.lowrank)

    @property
    def rank(self) -> int:
        return self.u.shape[0]

    def config_entry(self) -> dict:
        """This module's entry in ``quantization_config["modules"]``."""
        return {"kind": self.kind, "rank": self.rank}


@dataclass(frozen=True)
class PackedEntry:
    """A compressed module already swapped into the model as its packed runtime module (or
    already written, when streaming): all that ``quantization_config`` still needs of it."""

    kind: str
    entry: dict

    def config_entry(self) -> dict:
        return dict(self.entry)


@dataclass
class LayerRecord:
    """One row of the per-module log written beside the checkpoint."""

    block: int
    module: str
    seconds: float
    loss: float | None = None
    damp: float | None = None
    bits: int | None = None
    group_size: int | None = None
    sparsity: float | None = None
    note: str = ""


@dataclass
class CompressionResult:
    # full module name -> compressed weight: a result type of this module (.kind, .config_entry())
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    log: list[LayerRecord] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # method-specific results (scales, masks, ranks...)
