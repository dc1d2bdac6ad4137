"""Which reader loads each checkpoint format: one table, read by :func:`load_model`.

A config whose ``quantization_config.quant_method`` is in :data:`LOADERS` is read by that loader
(quantkit's packed format, GPTQ, AWQ); every other path is a float checkpoint, a ``.gguf`` file
or a hub id, read by :func:`quantkit.models.load.load_model`.

    >>> model, tok = load_model("out/smollm2-gptq-w4")    # any of them  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

from quantkit.checkpoint.awq import import_awq
from quantkit.checkpoint.gptq import import_gptq
from quantkit.checkpoint.hf import QuantkitConfig
from quantkit.checkpoint.packed import FORMAT, load_packed
from quantkit.models import load as float_load
from quantkit.models.paths import QUANT_METHOD, read_quantization_config
from quantkit.runtime.qlinear import QuantLinear


def load_quantkit(directory, dtype):
    """A packed quantkit checkpoint; its config keeps the ``quantization_config``, so the model's
    ``save_pretrained`` writes a checkpoint quantkit and transformers load again (audit F5)."""
    model = load_packed(directory, dtype)
    model.config.quantization_config = QuantkitConfig.from_dict(read_quantization_config(directory))
    return model


def imported(importer: Callable, method: str) -> Callable:
    """``importer`` (another tool's GPTQ/AWQ layout -> quantkit's runtime modules), with the model's
    config describing what it now holds, quantkit's format: its ``save_pretrained`` writes a quantkit
    checkpoint that quantkit and ``from_pretrained`` load again (audit F5, for imported checkpoints)."""

    def load(directory, dtype):
        model = importer(directory, dtype)
        modules = {name: m.config_entry() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
        first = next(iter(modules.values()), {})
        model.config.quantization_config = QuantkitConfig.from_dict({
            "quant_method": QUANT_METHOD, "format": FORMAT, "format_version": 1, "method": f"imported-{method}",
            "bits": first.get("bits"), "group_size": first.get("group_size"), "sym": first.get("sym"),
            "desc_act": any(e["act_order"] for e in modules.values()), "modules": modules})
        return model

    return load


LOADERS = {QUANT_METHOD: load_quantkit, "gptq": imported(import_gptq, "gptq"),
           "awq": imported(import_awq, "awq")}  # quant_method -> (directory, dtype) -> model


def load_model(path: str, dtype=None, device: str = "cpu", *, allow_pickle: bool = False,
               trust_remote_code: bool = False, with_tokenizer: bool = True):
    """``(model, tokenizer)`` for any checkpoint quantkit reads (model in eval mode on ``device``)."""
    return float_load.load_model(path, dtype, device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                 with_tokenizer=with_tokenizer, quantized=LOADERS)
