"""The Python API: what the CLI and recipes call.

    >>> from quantkit.api import compress, load_model
    >>> model, tok = load_model("tests/fixtures/stories260K")
    >>> result = compress(model, "gptq", {"bits": 4, "group_size": 32}, tokenizer=tok,
    ...                   calib="tinystories", nsamples=8, seqlen=128)
    >>> save(model, tok, "out/stories-gptq", "gptq", result)   # packs, writes atomically
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from quantkit.calibrate.driver import BlockHooks, CompressionResult, run_blockwise
from quantkit.checkpoint.packed import atomic_output_dir, pack_model, quantization_config, save_checkpoint
from quantkit.data import calibration_samples
from quantkit.errors import QuantkitError
from quantkit.memory import return_large_frees_to_os
from quantkit.models.load import load_model  # noqa: F401  (re-exported)
from quantkit.registry import get_method


def make_config(method_name: str, options: dict):
    """The method's config from ``options``; an option the method does not take is an error."""
    method = get_method(method_name)
    fields = {f.name for f in dataclasses.fields(method.config_cls)}
    unknown = sorted(k for k in options if k not in fields)
    if unknown:
        raise QuantkitError(f"method {method_name!r} does not take {', '.join(unknown)} (it takes: {', '.join(sorted(fields))})")
    try:
        return method.config_cls(**options)
    except TypeError as e:
        raise QuantkitError(f"bad options for {method_name}: {e}") from None


def check_finite(model) -> None:
    """Refuse weights holding NaN or Inf: every method would turn them into garbage silently."""
    for name, p in model.named_parameters():
        if p.is_meta:  # streaming: checked as each block is read (quantkit.calibrate.stream)
            continue
        if p.dtype.is_floating_point and not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise QuantkitError(f"{name} holds {bad} NaN/Inf value(s); refusing to compress a broken checkpoint")


def compress(model, method_name: str, options: dict | object, *, tokenizer=None, calib: str | None = None,
             nsamples: int = 128, seqlen: int = 2048, seed: int = 0, batch_size: int = 8,
             calib_ids: torch.Tensor | None = None,
             progress: Callable[[int, int, str], None] | None = None,
             hooks: BlockHooks | None = None, pack: bool = False) -> CompressionResult:
    """Compress ``model`` in place with a registered method; returns what was done per module.
    ``hooks``: see :class:`quantkit.calibrate.driver.BlockHooks` (streaming from disk, offloaded activations).
    ``pack=True``: each block's compressed linears become packed runtime modules as soon as the
    block is done (lower peak memory when the next step is :func:`save`).

    With ``quantize_lm_head=True`` in the options (weight-quantizing methods), the output head
    is quantized too, after the blocks (see :func:`quantkit.methods.base.quantize_head`)."""
    method_cls = get_method(method_name)
    return_large_frees_to_os()  # see quantkit.memory: keeps peak RSS near model + one block's activations
    check_finite(model)
    config = options if dataclasses.is_dataclass(options) else make_config(method_name, dict(options))
    method = method_cls(config)
    if getattr(config, "quantize_lm_head", False) and hooks is not None:  # the head's statistics need the whole model
        raise QuantkitError("quantize_lm_head needs the model in memory (it cannot stream)")
    if method.needs_calibration and calib_ids is None:
        if calib is None or tokenizer is None:
            raise QuantkitError(f"method {method_name!r} needs calibration data (--calib)")
        calib_ids = calibration_samples(tokenizer, calib, nsamples, seqlen, seed)
    model.config.use_cache = False
    result = run_blockwise(model, method, calib_ids if method.needs_calibration else None, batch_size, progress, hooks,
                           pack=pack)
    if getattr(config, "quantize_lm_head", False):
        from quantkit.methods.base import quantize_head

        quantize_head(model, method, calib_ids, batch_size, result)
    result.extra.setdefault("config", dataclasses.asdict(config))
    return result


def save(model, tokenizer, out: str | Path, method_name: str, result: CompressionResult, overwrite: bool = False,
         extra_config: dict | None = None) -> Path:
    """Pack the quantized linears and write the checkpoint to ``out`` atomically."""
    config = result.extra.get("config", {})
    qcfg = None
    if result.quantized:
        qcfg = quantization_config(method_name, result.quantized, config, extra_config)
        pack_model(model, result.quantized)
    with atomic_output_dir(out, overwrite) as tmp:
        save_checkpoint(model, tokenizer, tmp, qcfg, result)
    return Path(out)
