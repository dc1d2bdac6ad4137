"""Which runtime module loads each ``kind`` of compressed linear in a checkpoint: one static table.

Each class has ``from_entry(in_features, out_features, entry, bias, dtype)`` returning an empty
module whose buffers the checkpoint's tensors then fill.
"""

from __future__ import annotations

from quantkit.errors import QuantkitError
from quantkit.runtime.int8 import Int8Linear
from quantkit.runtime.lowrank import LowRankLinear
from quantkit.runtime.qlinear import QuantLinear
from quantkit.runtime.sparse import SparseLinear

KINDS: dict[str, type] = {"quant": QuantLinear, "w8a8": Int8Linear, "nm_sparse": SparseLinear, "lowrank": LowRankLinear}


def runtime_module_class(kind: str) -> type:
    if kind not in KINDS:
        raise QuantkitError(f"this quantkit cannot run modules of kind {kind!r} (known: {', '.join(sorted(KINDS))}); upgrade quantkit")
    return KINDS[kind]
