"""The Python API: what the CLI and recipes call.

    >>> from quantkit.api import compress, load_model
    >>> model, tok = load_model("tests/fixtures/stories260K")
    >>> result = compress(model, "gptq", {"bits": 4, "group_size": 32}, tokenizer=tok,
    ...                   calib="tinystories", nsamples=8, seqlen=128)
    >>> save(model, tok, "out/stories-gptq", "gptq", result)   # packs, writes atomically

Models larger than memory go through :func:`compress_streaming`, which reads the checkpoint one
block at a time and writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from quantkit.calibrate.driver import BlockHooks, run_blockwise
from quantkit.core.rotation import ROTATED_ATTR
from quantkit.models.arch import arch_for, get_module
from quantkit.core.types import CompressionResult
from quantkit.calibrate.workdir import MANIFEST_VERSION, WorkDir
from quantkit.checkpoint.output import atomic_output_dir, check_output
from quantkit.checkpoint.packed import quantization_config, save_checkpoint, save_metadata
from quantkit.checkpoint.streamed import StreamHooks, stream_settings
from quantkit.runtime.swap import pack_finished, pack_model, to_module
from quantkit.data import CalibSpec, calibration_samples
from quantkit.errors import QuantkitError, WriteError, os_reason
from quantkit.memory import return_large_frees_to_os
from quantkit.models.load import load_tokenizer
from quantkit.models.moe import checkpoint_names, unfuse_experts
from quantkit.models.safetensors import write_safetensors
from quantkit.models.skeleton import StreamSource, count_nonfinite
from quantkit.checkpoint.formats import load_model  # noqa: F401  (re-exported)
import quantkit.methods  # noqa: F401  (fills the registry: every built-in method registers itself)
from quantkit.registry import get_method, method_names  # noqa: F401  (re-exported)


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
        if p.is_meta:  # streaming: checked as each block is read (quantkit.checkpoint.streamed)
            continue
        bad = count_nonfinite(p.detach())
        if bad:
            raise QuantkitError(f"{name} holds {bad} NaN/Inf value(s); refusing to compress a broken checkpoint")


def check_uncompressed(model) -> None:
    """Refuse a model whose linears are already packed runtime modules (a quantized checkpoint):
    the methods read float weights."""
    arch = arch_for(model)
    for name in arch.linear_names(arch.blocks(model)[0]):
        mod = get_module(arch.blocks(model)[0], name)
        if not isinstance(getattr(mod, "weight", None), torch.Tensor):
            raise QuantkitError(f"{arch.blocks_path}.0.{name} is already compressed ({type(mod).__name__}): "
                                "compress the original model")


def default_progress() -> Callable[[int, int, str], None] | None:
    """A block-by-block progress bar (tqdm: a widget in a notebook, a line on a terminal) for an API
    caller who gave none and is watching; ``None`` when stderr is neither (logs, pipes, CI)."""
    if not (sys.stderr.isatty() or "ipykernel" in sys.modules):
        return None
    from tqdm.auto import tqdm

    state: dict = {}

    def update(done: int, total: int, info: str = "") -> None:
        bar = state.get("bar")
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=total, desc="quantkit", unit="block")
        bar.n = done
        bar.set_postfix_str(info, refresh=True)
        if done >= total:
            bar.close()

    return update


def compress(model, method_name: str, options: dict | object, *, tokenizer=None, calib: str | None = None,
             nsamples: int = CalibSpec.nsamples, seqlen: int = CalibSpec.seqlen, seed: int = CalibSpec.seed,
             batch_size: int = CalibSpec.batch_size,
             calib_ids: torch.Tensor | None = None,
             progress: Callable[[int, int, str], None] | bool | None = None,
             hooks: BlockHooks | None = None, pack: bool = False,
             device: torch.device | str | None = None) -> CompressionResult:
    """Compress ``model`` in place with a registered method; returns what was done per module.
    ``device`` (``"cuda"``, ``"cpu"``, ``"auto"``; default: where the model is): where each block
    calibrates and compresses; the model stays where it is and one block at a time visits the
    GPU (see :func:`quantkit.calibrate.driver.run_blockwise`).
    ``progress``: ``progress(done, total, info)`` after each block; by default (``None``) a progress
    bar on stderr where someone watches (a terminal or a notebook), ``False``: nothing.
    ``hooks``: see :class:`quantkit.calibrate.driver.BlockHooks` (streaming from disk, offloaded activations).
    ``pack=True``: each block's compressed linears become packed runtime modules as soon as the
    block is done (lower peak memory when the next step is :func:`save`).

    With ``quantize_lm_head=True`` in the options (weight-quantizing methods), the output head
    is quantized too, after the blocks (see :func:`quantkit.methods.base.quantize_head`)."""
    method_cls = get_method(method_name)
    return_large_frees_to_os()  # see quantkit.memory: keeps peak RSS near model + one block's activations
    check_finite(model)
    unfuse_experts(model)  # MoE: per-expert linears every method works on
    check_uncompressed(model)
    config = options if dataclasses.is_dataclass(options) else make_config(method_name, dict(options))
    method = method_cls(config)
    if getattr(config, "quantize_lm_head", False) and hooks is not None:  # the head's statistics need the whole model
        raise QuantkitError("quantize_lm_head needs the model in memory (it cannot stream)")
    calibrated = method.calibrates(config)
    if calibrated and calib_ids is None:
        if calib is None or tokenizer is None:
            raise QuantkitError(f"method {method_name!r} needs calibration data (--calib)")
        calib_ids = calibration_samples(tokenizer, calib, nsamples, seqlen, seed)
    progress = default_progress() if progress is None else (progress or None)
    use_cache, model.config.use_cache = getattr(model.config, "use_cache", True), False
    try:
        result = run_blockwise(model, method, calib_ids if calibrated else None, batch_size, progress, hooks,
                               to_module=to_module, finish_block=pack_finished if pack else None, device=device)
    finally:
        model.config.use_cache = use_cache  # the checkpoint's config keeps the model's own
    if getattr(config, "quantize_lm_head", False):
        from quantkit.methods.base import quantize_head

        quantize_head(model, method, calib_ids, batch_size, result)
    result.extra.setdefault("config", dataclasses.asdict(config))
    return result


def save(model, tokenizer, out: str | Path, method_name: str, result: CompressionResult, overwrite: bool = False,
         extra_config: dict | None = None, inputs=()) -> Path:
    """Pack the quantized linears and write the checkpoint to ``out`` atomically (``inputs``: paths
    ``out`` must neither be nor hold, see :func:`quantkit.checkpoint.output.check_output`)."""
    config = result.extra.get("config", {})
    rotation = result.extra.get("rotation") or getattr(model, ROTATED_ATTR, None)  # rotated by this run or before it
    online = bool(rotation and rotation.get("online"))  # the runtime must apply it: the config says so
    qcfg = None
    if result.quantized or online:
        extra = {**(extra_config or {}), **({"rotation": rotation} if rotation else {})}
        qcfg = quantization_config(method_name, result.quantized, config, extra or None)
        pack_model(model, result.quantized)
    with atomic_output_dir(out, overwrite, inputs) as tmp:
        save_checkpoint(model, tokenizer, tmp, qcfg, result)
    return Path(out)


def compress_streaming(model_path: str | Path, out: str | Path, method_name: str, options, *, calib: str | None = None,
                       nsamples: int = CalibSpec.nsamples, seqlen: int = CalibSpec.seqlen, seed: int = CalibSpec.seed,
                       batch_size: int = CalibSpec.batch_size, dtype=None,
                       resume: bool = False, overwrite: bool = False, offload_dir: str | Path | None = None,
                       trust_remote_code: bool = False, source: StreamSource | None = None,
                       progress: Callable[[int, int, str], None] | None = None,
                       device: torch.device | str | None = None) -> CompressionResult:
    """Compress a safetensors checkpoint block by block from disk and write the packed checkpoint to
    ``out`` (atomically): the same bytes :func:`compress` + :func:`save` write, without holding the
    model in memory.  ``resume``: continue the run that was killed writing ``out``;
    ``offload_dir``: where calibration activations go (default: the work dir)."""
    out = Path(out)
    check_output(out, overwrite, inputs=(model_path, calib))
    src = source or StreamSource.open(model_path, dtype, trust_remote_code)
    tok = load_tokenizer(str(model_path), trust_remote_code)
    config = options if dataclasses.is_dataclass(options) else make_config(method_name, dict(options))
    if getattr(config, "quantize_lm_head", False):
        raise QuantkitError("--stream does not quantize lm_head yet (it needs the whole model in front of it); drop --quantize-lm-head or --stream")
    if getattr(config, "target_bpw", None) is not None:
        raise QuantkitError("--target-bpw measures every linear on the whole model first: give --no-stream")
    calib_ids = None
    if get_method(method_name).calibrates(config):
        if calib is None:
            raise QuantkitError(f"method {method_name!r} needs calibration data (--calib)")
        calib_ids = calibration_samples(tok, calib, nsamples, seqlen, seed)
    work = WorkDir(out)
    manifest = _open_work(work, out, stream_settings(src, method_name, config, calib_ids, batch_size), resume, overwrite, offload_dir)
    hooks = StreamHooks(src, work, manifest, Path(manifest["acts_dir"]))  # a resumed run keeps its activations
    return _run_streamed(hooks, work, out, overwrite, tok, method_name, config, calib_ids, batch_size, progress, device)


def _os_what(e: OSError, where: Path) -> str:
    reason = os_reason(e)
    return f"cannot write {where}: {reason}" if reason else f"{type(e).__name__}: {str(e).strip()[:200]}"


def _open_work(work: WorkDir, out: Path, settings: dict, resume: bool, overwrite: bool, offload_dir) -> dict:
    """Lock ``out``'s work directory and return the manifest to run with: the unfinished run's
    (``resume``, same settings) or a fresh one."""
    work.acquire()
    manifest = None
    try:
        manifest = work.read_manifest()
        if manifest is not None and manifest["done"] == 0:
            manifest = None  # killed before its first block was written: nothing to resume
        if manifest is not None and not resume and not overwrite:
            raise QuantkitError(f"{work.path} holds an unfinished run for {out} ({manifest['done']} of "
                                f"{manifest.get('n_blocks', '?')} blocks done): pass --resume to continue it, or --overwrite to start over")
        if manifest is not None and resume:
            changed = [k for k, v in settings.items() if manifest.get("settings", {}).get(k) != v]
            if changed:
                raise QuantkitError(f"cannot resume {out}: the unfinished run in {work.path} was started with another "
                                    f"{' and another '.join(changed)}; pass --overwrite to start over")
            return manifest
        work.clear()
        key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]  # one directory per output
        acts = Path(offload_dir) / f"quantkit-acts-{key}" if offload_dir else work.path / "acts"
        manifest = {"version": MANIFEST_VERSION, "settings": settings, "done": 0, "acts_dir": str(acts.resolve())}
        work.write_manifest(manifest)
        return manifest
    except BaseException:
        if manifest is None or manifest.get("done", 0) == 0:
            work.remove()
        work.release()
        raise


def _run_streamed(hooks: StreamHooks, work: WorkDir, out: Path, overwrite: bool, tok, method_name: str, config,
                  calib_ids, batch_size: int, progress, device=None) -> CompressionResult:
    """Run the driver with the streaming hooks and assemble the checkpoint; a run stopped by
    something outside its inputs (disk full, out of memory, Ctrl-C) keeps its finished blocks."""
    keep = False
    try:
        result = compress(hooks.source.model, method_name, config, calib_ids=calib_ids, batch_size=batch_size,
                          progress=progress, hooks=hooks, device=device)
        qcfg = quantization_config(method_name, result.quantized, result.extra.get("config", {})) if result.quantized else None
        with atomic_output_dir(out, overwrite, inputs=(hooks.source.directory,)) as tmp:
            rename = checkpoint_names(hooks.source.model) if qcfg is None else (lambda n: n)  # float: transformers' names
            write_safetensors(tmp / "model.safetensors", [(rename(n), *rest) for n, *rest in hooks.entries()], {"format": "pt"})
            save_metadata(hooks.source.model, tok, tmp, qcfg, result)
        return result
    except WriteError as e:  # writing OUT failed (disk full...): fix it, then --resume
        keep = hooks.done > 0
        if not keep:
            raise
        raise WriteError(f"{e} ({hooks.done} finished block(s) kept in {work.path}: --resume continues)") from None
    except QuantkitError:
        raise  # bad input or settings: a resume would meet it again
    except (OSError, MemoryError, RuntimeError) as e:  # disk full, out of memory...: fix it, then --resume
        oom = isinstance(e, MemoryError) or "can't allocate memory" in str(e)
        keep = hooks.done > 0 and (oom or isinstance(e, OSError))
        if not keep:
            raise
        what = "out of memory" if oom else _os_what(e, work.path)
        raise QuantkitError(f"{what} ({hooks.done} finished block(s) kept in {work.path}: --resume continues)") from None
    except BaseException:  # Ctrl-C
        keep = hooks.done > 0
        raise
    finally:
        if keep:
            work.release()
        else:
            shutil.rmtree(hooks.acts_dir, ignore_errors=True)
            work.remove()
