"""quantkit: post-training quantization and compression for Hugging Face causal LMs.

Importing quantkit also teaches transformers to load quantkit checkpoints
(``AutoModelForCausalLM.from_pretrained(DIR)``: :mod:`quantkit.checkpoint.hf`): the quantizer is
registered through transformers' own registry as soon as transformers' quantizer table is
imported, or at once if it already is, so ``import quantkit`` itself loads neither torch nor
transformers (the console script starts light).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_QUANTIZER_TABLE = "transformers.quantizers.auto"


def _register_with_transformers() -> None:
    """Import :mod:`quantkit.checkpoint.hf`, which registers itself; if it is already imported, or
    being imported (it imports transformers' quantizer table first), it has done or will do so."""
    if "quantkit.checkpoint.hf" not in sys.modules:
        from quantkit.checkpoint import hf  # noqa: F401


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``transformers.quantizers.auto`` is first imported, it lets the
    normal finders locate it and registers quantkit's quantizer once that module has run."""

    def find_spec(self, name, path, target=None):
        if name != _QUANTIZER_TABLE:
            return None
        sys.meta_path.remove(self)  # once, and so that the lookup below does not come back here
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            _register_with_transformers()

        loader.exec_module = exec_module  # this module's own loader object
        return spec


if _QUANTIZER_TABLE in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterWhenImported) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenImported())
