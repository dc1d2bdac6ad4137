"""Which runtime module loads each ``kind`` of compressed linear in a checkpoint.

A module class registered here has ``from_entry(in_features, out_features, entry, bias, dtype)``
returning an empty module whose buffers the checkpoint's tensors then fill.
"""

from __future__ import annotations

from quantkit.errors import QuantkitError

_KINDS: dict[str, type] = {}


def register_runtime_module(kind: str):
    def wrap(cls):
        _KINDS[kind] = cls
        return cls

    return wrap


def runtime_module_class(kind: str) -> type:
    _load_builtin()
    if kind not in _KINDS:
        raise QuantkitError(f"this quantkit cannot run modules of kind {kind!r} (known: {', '.join(sorted(_KINDS))}); upgrade quantkit")
    return _KINDS[kind]


def _load_builtin() -> None:
    from quantkit.runtime import int8  # noqa: F401  (registers "w8a8")
    from quantkit.runtime.qlinear import QuantLinear
    import quantkit.runtime.sparse  # noqa: F401  (registers "nm_sparse")
    import quantkit.runtime.lowrank  # noqa: F401  (registers "lowrank")

    _KINDS.setdefault("quant", QuantLinear)
