"""The one registry of compression methods, read by the CLI and by recipes alike.  It is filled
by importing :mod:`quantkit.methods` (each method module registers itself); :mod:`quantkit.api`
does that once, so read the registry through ``api.get_method`` / ``api.method_names``.

    @register_method("gptq", GPTQConfig)
    class GPTQ(BlockMethod): ...

    method = get_method("gptq")          # QuantkitError listing the known names otherwise
    config = method.config_cls(bits=4)   # frozen dataclass that checks itself
"""

from __future__ import annotations

from quantkit.errors import QuantkitError, excerpt

_METHODS: dict[str, type] = {}


def register_method(name: str, config_cls: type):
    def wrap(cls):
        if name in _METHODS:
            raise RuntimeError(f"method {name!r} registered twice")
        cls.name = name
        cls.config_cls = config_cls
        _METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str):
    if name not in _METHODS:
        raise QuantkitError(f"unknown method {excerpt(name)}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_names(kind: str | None = None) -> list[str]:
    """Registered names, optionally only those of one ``kind`` ("quantize", "prune", "lowrank")."""
    return sorted(n for n, c in _METHODS.items() if kind is None or getattr(c, "kind", "quantize") == kind)
