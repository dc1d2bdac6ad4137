"""The ``quantkit`` command line (click + rich).

Every user error is one line on stderr and a non-zero exit; ``--json`` prints one JSON object
on stdout; progress goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from quantkit.errors import QuantkitError
from quantkit.memory import peak_rss_bytes
from quantkit.serve.cli import kv_cache_options

err_console = Console(stderr=True)


class _Group(click.Group):
    """Turns QuantkitError (and stray exceptions) into one-line click errors."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QuantkitError as e:
            raise click.ClickException(str(e)) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except MemoryError:
            raise click.ClickException("out of memory; try a smaller --nsamples/--seqlen/--batch-size") from None
        except Exception as e:  # noqa: BLE001 - last line of defence: no tracebacks for users
            if "can't allocate memory" in str(e):  # torch's CPU allocator raises RuntimeError, not MemoryError
                raise click.ClickException("out of memory; try a smaller --nsamples/--seqlen/--batch-size, or --stream") from None
            if os.environ.get("QUANTKIT_DEBUG"):
                raise
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise click.ClickException(f"internal error: {type(e).__name__}: {msg} (set QUANTKIT_DEBUG=1 for a traceback)") from None


def _progress(enabled: bool):
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, disable=not enabled, transient=False)


def _emit(as_json: bool, payload: dict, table: Table | None = None) -> None:
    if as_json:
        click.echo(json.dumps(payload))
    elif table is not None:
        Console().print(table)


def _given(ctx: click.Context, names: list[str]) -> dict:
    """Options the user actually gave (so a method's own defaults apply to the rest)."""
    src = click.core.ParameterSource
    return {n: ctx.params[n] for n in names if ctx.get_parameter_source(n) not in (src.DEFAULT, src.DEFAULT_MAP, None)}


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quantkit")
def cli():
    """quantkit: compress Hugging Face causal LMs (GPTQ, AWQ, SmoothQuant, pruning, low-rank) and run them."""


def _model_options(f):
    f = click.option("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's).")(f)
    f = click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) weights.")(f)
    f = click.option("--trust-remote-code", is_flag=True, help="Run model code shipped with the checkpoint.")(f)
    return f


def _check_positive(name: str, value: int | None, upper: int | None = None) -> None:
    if value is None:
        return
    if value < 1 or (upper is not None and value > upper):
        raise QuantkitError(f"{name} must be between 1 and {upper}, got {value}" if upper else f"{name} must be positive, got {value}")


QUANT_OPTIONS = ["bits", "group_size", "sym", "act_order", "static_groups", "damp", "true_sequential", "blocksize",
                 "alpha", "act_quant", "n_grid", "clip", "quantize_lm_head"]


def _output_options(f):
    """``-o/--output``, ``--overwrite`` and ``--json``: every command that writes a checkpoint."""
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(f)
    f = click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")(f)
    f = click.option("-o", "--output", "output", required=True, help="Output directory (written atomically).")(f)
    return f


def _calib_options(f):
    """The calibration set: what every calibrated compression command takes."""
    f = click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration windows per forward.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration windows.")(f)
    f = click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per calibration window.")(f)
    f = click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows.")(f)
    f = click.option("--calib", default="c4", show_default=True, help="Calibration data: a dataset name or a local file.")(f)
    return f


def _check_run(method_cls, output: str, overwrite: bool, nsamples: int, seqlen: int, batch_size: int) -> None:
    """Refuse bad sizes and an existing OUTPUT before any work."""
    _check_positive("--nsamples", nsamples, 1_000_000)
    _check_positive("--seqlen", seqlen, 1_048_576)
    _check_positive("--batch-size", batch_size)
    if method_cls.needs_calibration:
        from quantkit.data import check_calibration_size

        check_calibration_size(nsamples, seqlen)
    if os.path.exists(output) and not overwrite:
        raise QuantkitError(f"output {output} already exists; pass --overwrite to replace it")


def _load_for_compression(model: str, method_cls, calib: str, nsamples: int, seqlen: int, seed: int, dtype,
                          allow_pickle: bool, trust_remote_code: bool):
    """``(model, tokenizer, calibration ids or None, bytes before)``.  The calibration text is
    tokenized before the model is loaded: tokenizing a long text briefly takes several times its
    ids, and doing it first keeps that transient off the model's peak memory."""
    from quantkit import api
    from quantkit.data import calibration_samples
    from quantkit.memory import return_large_frees_to_os
    from quantkit.models.load import load_tokenizer, model_bytes

    return_large_frees_to_os()  # before the first large allocation: see quantkit.memory
    calib_ids = None
    if method_cls.needs_calibration:
        tok = load_tokenizer(model, trust_remote_code)
        calib_ids = calibration_samples(tok, calib, nsamples, seqlen, seed)
        m, _ = api.load_model(model, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                              with_tokenizer=False)
        cap = getattr(m.config, "max_position_embeddings", None)
        if cap and seqlen > cap:
            raise QuantkitError(f"--seqlen {seqlen} exceeds the model's context of {cap} tokens")
    else:
        m, tok = api.load_model(model, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return m, tok, calib_ids, model_bytes(m)


def _compress(m, method: str, config, calib_ids, batch_size: int, as_json: bool, hooks=None, pack: bool = False):
    """``api.compress`` with a progress bar on stderr (``pack``: see ``api.compress``)."""
    from quantkit import api

    with _progress(not as_json or sys.stderr.isatty()) as prog:
        task = prog.add_task(f"{method}", total=None, info="")
        return api.compress(m, method, config, calib_ids=calib_ids, batch_size=batch_size, hooks=hooks, pack=pack,
                            progress=lambda i, n, info: prog.update(task, completed=i, total=n, info=info))


def _report(res, payload: dict, keys: tuple, title: str, as_json: bool, skip_note=lambda note: False,
            fmt=lambda k, v: str(v)) -> None:
    """Print the run's notes (stderr), then ``payload`` as JSON or as a two-column table."""
    for r in res.log:
        if r.note and not skip_note(r.note):
            err_console.print(f"[yellow]note[/] {r.module}: {r.note}")
    table = Table(title=title)
    for k in keys:
        table.add_row(k, fmt(k, payload[k]))
    table.show_header = False
    _emit(as_json, payload, table)



@cli.command()
@click.argument("model")
@click.option("--method", default="gptq", show_default=True, help="Compression method (see `quantkit methods`).")
@click.option("--bits", type=int, default=4, show_default=True)
@click.option("--group-size", type=int, default=128, show_default=True, help="Input columns per scale; -1 = per channel.")
@click.option("--sym/--asym", default=True, show_default=True)
@click.option("--act-order/--no-act-order", default=True, show_default=True,
              help="GPTQ: quantize columns by decreasing Hessian diagonal.")
@click.option("--static-groups/--no-static-groups", default=True, show_default=True,
              help="GPTQ with --act-order: fix group grids up front (contiguous groups, no g_idx); "
                   "--no-static-groups stores a g_idx.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="GPTQ damping (fraction of mean diag H).")
@click.option("--true-sequential", is_flag=True, help="Re-collect statistics after each group of linears.")
@click.option("--blocksize", type=int, default=128, show_default=True, help="GPTQ lazy-batch block size.")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="SmoothQuant migration strength; 0 = naive W8A8.")
@click.option("--act-quant", type=click.Choice(["dynamic", "static"]), default="dynamic", show_default=True,
              help="SmoothQuant activations: int8 per token at run time, or one calibrated scale per tensor.")
@click.option("--n-grid", type=int, default=20, show_default=True, help="AWQ: alpha grid points in [0, 1].")
@click.option("--clip/--no-clip", default=True, show_default=True, help="AWQ: search a clipping range per weight group.")
@click.option("--quantize-lm-head", is_flag=True,
              help="Quantize lm_head too (untied from the embeddings, which stay float); GPTQ calibrates it on the final norm's output.")
@_calib_options
@click.option("--stream/--no-stream", default=None,
              help="Read a safetensors MODEL one block at a time from disk (memory: about one block), resumable "
                   "[default: when its weights exceed half the available memory].")
@click.option("--resume", is_flag=True, help="Continue the --stream run that was killed writing OUTPUT (implies --stream).")
@click.option("--offload-activations", "offload", default=None, metavar="DIR",
              help="Keep calibration activations in files under DIR (with --stream they are always in files, by default beside OUTPUT).")
@_output_options
@_model_options
@click.pass_context
def quantize(ctx, model, output, method, calib, nsamples, seqlen, seed, batch_size, stream, resume, offload, overwrite,
             as_json, dtype, allow_pickle, trust_remote_code, **_):
    """Quantize MODEL (a directory, .gguf file or hub id) and write a packed checkpoint.
    With --stream the overwrite check covers an unfinished run of OUTPUT too."""
    from quantkit import api
    from quantkit.calibrate.offload import OffloadHooks
    from quantkit.models.skeleton import StreamSource, should_stream
    from quantkit.models.load import dir_bytes

    method_cls = api.get_method(method)
    config = api.make_config(method, _given(ctx, QUANT_OPTIONS))
    _check_run(method_cls, output, overwrite, nsamples, seqlen, batch_size)
    if resume and stream is False:
        raise QuantkitError("--resume continues a --stream run; drop --no-stream")
    if stream is None:
        stream = resume or should_stream(model, dtype)
        if stream and not resume:
            err_console.print(f"[yellow]note[/] {model}'s weights exceed half the available memory: streaming them "
                              "block by block (--no-stream loads the model whole)")
    t0 = time.perf_counter()
    if stream:
        src = StreamSource.open(model, dtype, trust_remote_code)
        bytes_before = src.nbytes()
        seqlen_cap = getattr(src.model.config, "max_position_embeddings", None)
        if method_cls.needs_calibration and seqlen_cap and seqlen > seqlen_cap:
            raise QuantkitError(f"--seqlen {seqlen} exceeds the model's context of {seqlen_cap} tokens")
        with _progress(not as_json or sys.stderr.isatty()) as prog:
            task = prog.add_task(f"{method}", total=None, info="")
            res = api.compress_streaming(
                model, output, method, config, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                batch_size=batch_size, resume=resume, overwrite=overwrite, offload_dir=offload,
                trust_remote_code=trust_remote_code, source=src,
                progress=lambda i, n, info: prog.update(task, completed=i, total=n, info=info))
    else:
        m, tok, calib_ids, bytes_before = _load_for_compression(model, method_cls, calib, nsamples, seqlen, seed, dtype,
                                                                allow_pickle, trust_remote_code)
        hooks = OffloadHooks(offload) if offload else None
        try:
            res = _compress(m, method, config, calib_ids, batch_size, as_json, hooks, pack=True)
        finally:
            if hooks is not None:
                hooks.cleanup()
        api.save(m, tok, output, method, res, overwrite=overwrite)
    payload = {
        "output": os.path.abspath(output), "method": method, "bits": getattr(config, "bits", None),
        "group_size": getattr(config, "group_size", None), "bytes_before": bytes_before,
        "bytes_after": dir_bytes(output), "seconds": round(time.perf_counter() - t0, 3), "peak_rss_bytes": peak_rss_bytes(),
        "modules": len(res.quantized), "stream": stream,
    }
    _report(res, payload, ("output", "method", "bits", "group_size", "modules", "bytes_before", "bytes_after", "seconds",
                           "peak_rss_bytes"), f"quantkit quantize --method {method}", as_json)

@cli.command()
@click.argument("model")
@click.option("--method", default="sparsegpt", show_default=True, help="sparsegpt, wanda or magnitude (see `quantkit methods`).")
@click.option("--sparsity", type=float, default=None, help="Fraction of each linear's weights to prune, in (0, 1) [default: 0.5].")
@click.option("--pattern", default=None, help="N:M semi-structured sparsity instead: keep N of every M inputs (2:4, 4:8...).")
@click.option("--packed", is_flag=True, help="With --pattern: store kept values + indices (quantkit runtime) instead of dense zeros.")
@click.option("--bits", type=int, default=None, help="SparseGPT: also quantize the kept weights in the same pass.")
@click.option("--group-size", type=int, default=128, show_default=True, help="With --bits: input columns per scale; -1 = per channel.")
@click.option("--sym/--asym", default=True, show_default=True, help="With --bits: symmetric grid.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="SparseGPT damping (fraction of mean diag H).")
@click.option("--blocksize", type=int, default=128, show_default=True, help="SparseGPT adaptive-mask block size.")
@_calib_options
@_output_options
@_model_options
@click.pass_context
def prune(ctx, model, output, method, calib, nsamples, seqlen, seed, batch_size, overwrite, as_json, dtype,
          allow_pickle, trust_remote_code, **_):
    """Prune MODEL's linears (unstructured or N:M) and write a checkpoint: dense with zeros
    (plain transformers loads it), packed N:M with --packed, or quantized with --bits."""
    from quantkit import api
    from quantkit.models.load import dir_bytes
    from quantkit.api import method_names

    method_cls = api.get_method(method)
    if getattr(method_cls, "kind", "quantize") != "prune":
        raise QuantkitError(f"{method!r} is not a pruning method; pruning methods: {', '.join(method_names('prune'))}")
    given = _given(ctx, ["sparsity", "pattern", "packed", "bits", "group_size", "sym", "damp", "blocksize"])
    if "sparsity" in given and "pattern" in given:
        raise QuantkitError("give --sparsity or --pattern, not both")
    config = api.make_config(method, given)
    _check_run(method_cls, output, overwrite, nsamples, seqlen, batch_size)
    t0 = time.perf_counter()
    m, tok, calib_ids, bytes_before = _load_for_compression(model, method_cls, calib, nsamples, seqlen, seed, dtype,
                                                            allow_pickle, trust_remote_code)
    res = _compress(m, method, config, calib_ids, batch_size, as_json)
    api.save(m, tok, output, method, res, overwrite=overwrite)
    seconds = time.perf_counter() - t0
    sp = res.extra["sparsity"]
    payload = {
        "output": os.path.abspath(output), "method": method, "sparsity": config.sparsity, "pattern": config.pattern,
        "packed": config.packed, "bits": getattr(config, "bits", None),
        "group_size": getattr(config, "group_size", None) if getattr(config, "bits", None) else None,
        "modules": sp["modules"], "sparsity_overall": sp["overall"], "sparsity_min": sp["min"], "sparsity_max": sp["max"],
        "bytes_before": bytes_before, "bytes_after": dir_bytes(output), "seconds": round(seconds, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    _report(res, payload, ("output", "method", "sparsity", "pattern", "packed", "bits", "group_size", "modules",
                           "sparsity_overall", "sparsity_min", "sparsity_max", "bytes_before", "bytes_after", "seconds",
                           "peak_rss_bytes"), f"quantkit prune --method {method}", as_json,
            fmt=lambda k, v: f"{v:.4f}" if isinstance(v, float) and k.startswith("sparsity") else str(v))


@cli.command()
@click.argument("model")
@click.option("--method", default="asvd", show_default=True,
              help="asvd (activation-aware: SVD-LLM whitening, or ASVD scaling with --scaling act) or svd (plain).")
@click.option("--ratio", type=float, default=None, help="Fraction of each factorized layer's parameters kept [default: 0.8].")
@click.option("--rank", type=int, default=None, help="The same rank for every layer instead.")
@click.option("--energy", type=float, default=None, help="Per layer, the smallest rank keeping this fraction of the squared spectrum.")
@click.option("--scaling", type=click.Choice(["whiten", "act"]), default="whiten", show_default=True,
              help="asvd: Cholesky whitening of X^T X (SVD-LLM) or activation-magnitude scaling (ASVD).")
@click.option("--damp", type=float, default=0.01, show_default=True, help="asvd whitening damping (fraction of mean diag).")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="asvd --scaling act: exponent of mean |x|.")
@_calib_options
@_output_options
@_model_options
@click.pass_context
def lowrank(ctx, model, output, method, calib, nsamples, seqlen, seed, batch_size, overwrite, as_json, dtype,
            allow_pickle, trust_remote_code, **_):
    """Factorize MODEL's linears into two low-rank linears (W ~= V U) and write a checkpoint whose
    config records each module's rank; a layer is factorized only where that saves parameters."""
    from quantkit import api
    from quantkit.models.load import dir_bytes
    from quantkit.api import method_names

    method_cls = api.get_method(method)
    if getattr(method_cls, "kind", "quantize") != "lowrank":
        raise QuantkitError(f"{method!r} is not a low-rank method; low-rank methods: {', '.join(method_names('lowrank'))}")
    given = _given(ctx, ["ratio", "rank", "energy"])
    if len(given) > 1:
        raise QuantkitError(f"give one of --ratio, --rank and --energy, not {' and '.join('--' + k for k in given)}")
    asvd_only = _given(ctx, ["scaling", "damp", "alpha"])
    if asvd_only and method != "asvd":
        raise QuantkitError(f"{', '.join('--' + k for k in asvd_only)} only apply to --method asvd")
    config = api.make_config(method, {**given, **asvd_only})
    _check_run(method_cls, output, overwrite, nsamples, seqlen, batch_size)
    t0 = time.perf_counter()
    m, tok, calib_ids, bytes_before = _load_for_compression(model, method_cls, calib, nsamples, seqlen, seed, dtype,
                                                            allow_pickle, trust_remote_code)
    res = _compress(m, method, config, calib_ids, batch_size, as_json)
    s = res.extra["lowrank"]
    api.save(m, tok, output, method, res, overwrite=overwrite,
             extra_config={"lowrank": {k: s[k] for k in ("params_before", "params_after", "ratio", "ratio_model")}})
    seconds = time.perf_counter() - t0
    ranks = list(s["ranks"].values())
    payload = {
        "output": os.path.abspath(output), "method": method, "ratio_target": config.ratio, "rank": config.rank,
        "energy": config.energy, "modules": s["modules"], "left_dense": s["left_dense"],
        "rank_min": min(ranks) if ranks else None, "rank_max": max(ranks) if ranks else None,
        "params_before": s["params_before"], "params_after": s["params_after"], "param_ratio": s["ratio"],
        "param_ratio_linears": s["ratio_linears"], "model_params_before": s["model_params_before"],
        "model_params_after": s["model_params_after"], "param_ratio_model": s["ratio_model"],
        "bytes_before": bytes_before, "bytes_after": dir_bytes(output), "seconds": round(seconds, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    err_console.print(f"factorized {s['modules']} linears ({s['left_dense']} left dense): parameters kept "
                      f"{s['params_after']}/{s['params_before']} = {s['ratio']:.4f} of the factorized layers, "
                      f"{s['ratio_linears']:.4f} of all block linears, {s['ratio_model']:.4f} of the model")
    _report(res, payload, ("output", "method", "ratio_target", "rank", "energy", "modules", "left_dense", "rank_min",
                           "rank_max", "params_before", "params_after", "param_ratio", "param_ratio_linears",
                           "param_ratio_model", "bytes_before", "bytes_after", "seconds", "peak_rss_bytes"),
            f"quantkit lowrank --method {method}", as_json, skip_note=lambda note: note.startswith("rank "),
            fmt=lambda k, v: f"{v:.4f}" if isinstance(v, float) and k.startswith("param_ratio") else str(v))


@cli.command()
@click.option("--teacher", required=True, help="The original model (directory, .gguf file or hub id).")
@click.option("--student", required=True, help="The model to train: a compressed checkpoint or a smaller model sharing the tokenizer.")
@click.option("-o", "--output", "output", required=True, help="Output directory (written atomically), in the student's format.")
@click.option("--data", default="c4", show_default=True, help="Training text: a dataset name or a local file.")
@click.option("--steps", type=int, default=200, show_default=True)
@click.option("--seqlen", type=int, default=256, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Windows per step.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak AdamW learning rate (warm-up, cosine decay).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Softmax temperature of the KL term.")
@click.option("--hidden-mse", type=float, default=0.0, show_default=True, help="Weight of the hidden-state MSE term (same-shape students).")
@click.option("--train-embeddings", is_flag=True, help="Also train the input/output embeddings (frozen by default).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) weights.")
@click.option("--trust-remote-code", is_flag=True, help="Run model code shipped with the checkpoints.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def distill(teacher, student, output, data, steps, seqlen, batch_size, lr, temperature, hidden_mse, train_embeddings,
            seed, allow_pickle, trust_remote_code, overwrite, as_json):
    """Recover STUDENT by knowledge distillation from TEACHER (KL on softened logits, optional
    hidden-state MSE), on the CPU; sparsity masks, ranks and quantization grids are preserved."""
    from pathlib import Path

    import torch

    from quantkit import distill as kd
    from quantkit.data import calibration_samples
    from quantkit.models.paths import read_quantization_config
    from quantkit.checkpoint.formats import load_model

    _check_positive("--steps", steps, 10_000_000)
    _check_positive("--seqlen", seqlen, 1_048_576)
    _check_positive("--batch-size", batch_size)
    if not lr > 0 or not temperature > 0 or hidden_mse < 0:
        raise QuantkitError("--lr and --temperature must be positive and --hidden-mse non-negative")
    if os.path.exists(output) and not overwrite:
        raise QuantkitError(f"output {output} already exists; pass --overwrite to replace it")
    qcfg = read_quantization_config(student) if Path(student).is_dir() else None
    if qcfg is not None and qcfg.get("quant_method") != "quantkit":
        raise QuantkitError(f"{student} is quantized by {qcfg.get('quant_method')!r}, not quantkit: cannot keep its format")
    kd.check_student_kinds(qcfg)
    t0 = time.perf_counter()
    t_model, t_tok = load_model(teacher, dtype="float32", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    s_model, s_tok = load_model(student, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    s_dtype = next(p.dtype for p in s_model.parameters() if p.dtype.is_floating_point)
    if qcfg is None and s_dtype != torch.float32:
        s_model.float()  # train in float32; saved back in the student's dtype
    kd.check_tokenizers(t_tok, s_tok)
    kd.check_pair(t_model, s_model, hidden_mse)
    cap = min(c for c in (getattr(t_model.config, "max_position_embeddings", None),
                          getattr(s_model.config, "max_position_embeddings", None), 1 << 30) if c)
    if seqlen > cap:
        raise QuantkitError(f"--seqlen {seqlen} exceeds the models' context of {cap} tokens")
    ids = calibration_samples(s_tok, data, steps * batch_size, seqlen, seed)
    heldout = calibration_samples(s_tok, data, 4, seqlen, seed + 1)
    with _progress(not as_json or sys.stderr.isatty()) as prog:
        task = prog.add_task("distill", total=steps, info="")
        rep = kd.distill(t_model, s_model, ids, steps=steps, batch_size=batch_size, lr=lr, temperature=temperature,
                         hidden_weight=hidden_mse, train_embeddings=train_embeddings, heldout=heldout,
                         progress=lambda i, n, loss: prog.update(task, completed=i, info=f"kd {loss:.4f}"))
    kd.save_student(s_model, s_tok, output, qcfg, overwrite=overwrite, dtype=s_dtype)
    payload = {"output": os.path.abspath(output), "teacher": teacher, "student": student,
               "student_format": "quantkit packed" if qcfg else "float",
               **{k: v for k, v in rep.items() if k not in ("losses", "kd_losses")},
               "seconds": round(time.perf_counter() - t0, 3), "peak_rss_bytes": peak_rss_bytes()}
    table = Table(title="quantkit distill")
    for k in ("output", "student_format", "steps", "batch_size", "seqlen", "tokens", "lr", "temperature", "hidden_mse",
              "trainable_params", "masked_weights", "kd_first", "kd_last", "heldout_kd_before", "heldout_kd_after",
              "seconds", "peak_rss_bytes"):
        v = payload[k]
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) and k.startswith(("kd", "heldout")) else str(v))
    table.show_header = False
    _emit(as_json, payload, table)


@cli.command(name="run")
@click.argument("recipe")
@click.argument("model")
@click.option("-o", "--output", "output", required=True, help="Output directory (written atomically).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe value, e.g. steps.0.bits=3.")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@_model_options
def run_cmd(recipe, model, output, sets, overwrite, as_json, dtype, allow_pickle, trust_remote_code):
    """Run the steps of a YAML RECIPE on MODEL and write the result (the recipe is validated first)."""
    from quantkit import api
    from quantkit.models.load import dir_bytes, model_bytes
    from quantkit.recipe import load_recipe, run_recipe

    rec = load_recipe(recipe, tuple(sets))
    if os.path.exists(output) and not overwrite:
        raise QuantkitError(f"output {output} already exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    m, tok = api.load_model(model, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    bytes_before = model_bytes(m)
    with _progress(not as_json or sys.stderr.isatty()) as prog:
        task = prog.add_task("recipe", total=None, info="")
        res = run_recipe(rec, m, tok, progress=lambda i, a, b, info: prog.update(
            task, completed=a, total=b, description=f"step {i + 1}/{len(rec.steps)} {rec.steps[i].method}", info=info))
    name = "+".join(s.method for s in rec.steps)
    api.save(m, tok, output, name, res, overwrite=overwrite, extra_config={"recipe": rec.source})
    payload = {"output": os.path.abspath(output), "recipe": os.path.abspath(recipe), "steps": [s.method for s in rec.steps],
               "bytes_before": bytes_before, "bytes_after": dir_bytes(output), "seconds": round(time.perf_counter() - t0, 3),
               "peak_rss_bytes": peak_rss_bytes(), "modules": len(res.quantized)}
    table = Table(title=f"quantkit run {os.path.basename(recipe)}", show_header=False)
    for k, v in payload.items():
        table.add_row(k, str(v))
    _emit(as_json, payload, table)


@cli.command()
@click.argument("checkpoint")
@click.option("--format", "fmt", type=click.Choice(["gptq", "gguf"]), required=True,
              help="gptq: qweight/qzeros/scales/g_idx as transformers, GPTQModel and vLLM read them. "
                   "gguf: one file llama.cpp runs (4-bit sym -> Q4_0, 4-bit asym -> Q4_1, 8-bit sym -> Q8_0).")
@click.option("-o", "--output", "output", required=True, help="A directory (gptq) or a .gguf file (gguf).")
@click.option("--float-type", type=click.Choice(["f16", "f32"]), default="f16", show_default=True,
              help="gguf: type of float matrices (embeddings, layers left in float); norms are always F32.")
@click.option("--requant", type=click.Choice(["f32", "f16", "q8_0"]), default=None,
              help="gguf: write layers whose grid has no exact ggml type (3-bit, groups not a multiple of 32, "
                   "act-order without static groups) in this type instead of refusing.")
@click.option("--tokenizer-pre", default=None,
              help="gguf: llama.cpp pre-tokenizer name for byte-level BPE vocabularies (default: recognised from tokenizer.json).")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def export(checkpoint, fmt, output, float_type, requant, tokenizer_pre, overwrite, as_json):
    """Export a quantkit CHECKPOINT to a format other engines run."""
    from quantkit.models.load import dir_bytes

    if fmt == "gguf":
        from quantkit.checkpoint.gguf import export_gguf

        summary = export_gguf(checkpoint, output, float_type=float_type, requant=requant, tokenizer_pre=tokenizer_pre,
                              overwrite=overwrite)
        payload = {"output": os.path.abspath(output), "format": fmt, "bytes": summary["bytes"], "tensors": summary["tensors"],
                   "tokenizer": summary["tokenizer"]}
    else:
        if requant or tokenizer_pre or float_type != "f16":
            raise QuantkitError("--float-type, --requant and --tokenizer-pre apply to --format gguf only")
        from quantkit.checkpoint.gptq import export_gptq

        export_gptq(checkpoint, output, overwrite)
        payload = {"output": os.path.abspath(output), "format": fmt, "bytes": dir_bytes(output)}
    _emit(as_json, payload, None)
    if not as_json:
        kinds = ", ".join(f"{n} {t}" for t, n in payload.get("tensors", {}).items())
        err_console.print(f"wrote {fmt} checkpoint to {output} ({payload['bytes'] / 1e6:.1f} MB{'; ' + kinds if kinds else ''})")


@cli.group(name="eval", cls=_Group)
def eval_group():
    """Evaluate a float or packed model."""


@eval_group.command()
@click.argument("model")
@click.option("--dataset", default="wikitext2", show_default=True, help="A dataset name or a local text file.")
@click.option("--split", default="test", show_default=True)
@click.option("--seqlen", type=int, default=2048, show_default=True)
@click.option("--max-windows", type=int, default=None, help="Evaluate only the first N windows.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "reference", "cpu", "triton"]), default=None,
              help="Kernel path for packed weights (default: auto).")
@kv_cache_options
@click.option("--json", "as_json", is_flag=True)
@_model_options
def perplexity(model, dataset, split, seqlen, max_windows, batch_size, backend, kv_bits, kv_keys, as_json, dtype,
               allow_pickle, trust_remote_code):
    """Perplexity of MODEL (GPTQ protocol: non-overlapping windows, mean NLL of every predicted token)."""
    from quantkit.data import eval_windows, load_text, tokenize
    from quantkit.eval.perplexity import perplexity as ppl_fn
    from quantkit.checkpoint.formats import load_model

    _check_positive("--seqlen", seqlen, 1_048_576)
    _check_positive("--max-windows", max_windows)
    _check_positive("--batch-size", batch_size)
    if backend:
        os.environ["QUANTKIT_BACKEND"] = backend
    m, tok = load_model(model, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    cap = getattr(m.config, "max_position_embeddings", None)
    if cap and seqlen > cap:
        raise QuantkitError(f"--seqlen {seqlen} exceeds the model's context of {cap} tokens")
    windows = eval_windows(tokenize(tok, load_text(dataset, split)), seqlen, max_windows)
    running = []
    with _progress(not as_json or sys.stderr.isatty()) as prog:
        task = prog.add_task("perplexity", total=windows.shape[0], info="")

        def report(i, n, ppl):
            running.append(f"[{i}]{ppl:.4f}")
            prog.update(task, completed=i, info=f"ppl {ppl:.4f}")

        if kv_bits:
            from quantkit.runtime.kvcache import KVCachedLM, KVQuantConfig, kv_bytes_per_token

            kv = KVQuantConfig(bits=int(kv_bits), keys=kv_keys)
            res = ppl_fn(KVCachedLM(m, kv), windows, batch_size, report)
            res.update(kv_bits=kv.bits, kv_keys=kv.keys, kv_bytes_per_token=kv_bytes_per_token(m.config, kv),
                       kv_bytes_per_token_fp16=kv_bytes_per_token(m.config, None, 2))
        else:
            res = ppl_fn(m, windows, batch_size, report)
    res["dataset"] = dataset
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(",".join(running))
        click.echo(f"Final estimate: PPL = {res['perplexity']:.4f} +/- {res['stderr']:.5f}  "
                   f"({res['windows']} windows x {seqlen} tokens, {res['tokens']} scored, {res['seconds']:.1f} s)")
        if kv_bits:
            click.echo(f"KV cache int{kv_bits} ({kv_keys} key scales): {res['kv_bytes_per_token']:.0f} bytes/token "
                       f"vs {res['kv_bytes_per_token_fp16']:.0f} in fp16")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def methods(as_json):
    """List the registered compression methods and their options."""
    import dataclasses

    from quantkit.api import get_method, method_names

    rows = {}
    for name in method_names():
        cls = get_method(name)
        rows[name] = {"kind": getattr(cls, "kind", "quantize"), "calibration": cls.needs_calibration,
                      "options": {f.name: f.default for f in dataclasses.fields(cls.config_cls) if f.name != "overrides"}}
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    table = Table("method", "kind", "calibration", "options")
    for name, r in rows.items():
        table.add_row(name, r["kind"], str(r["calibration"]), ", ".join(f"{k}={v}" for k, v in r["options"].items()))
    Console().print(table)


from quantkit.serve import generate_command, serve_command  # noqa: E402  (light: no torch at import)

cli.add_command(generate_command)
cli.add_command(serve_command)
cli.add_command(__import__("quantkit.eval.speed", fromlist=["bench"]).bench)  # issue 6 (light: no torch at import)


@cli.command()
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--original", default=None, help="The uncompressed model (default: the first CHECKPOINT).")
@click.option("--dataset", default="wikitext2", show_default=True)
@click.option("--split", default="test", show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--max-windows", type=int, default=8, show_default=True)
@click.option("--speed/--no-speed", default=True, show_default=True, help="Also time greedy decoding.")
@click.option("--plot", default=None, help="Write a size-vs-perplexity Pareto plot (PNG, needs matplotlib).")
@click.option("--json", "as_json", is_flag=True)
def compare(checkpoints, original, dataset, split, seqlen, max_windows, speed, plot, as_json):
    """Evaluate CHECKPOINTS and the original side by side: size, bits/weight, perplexity, KL, tok/s."""
    from quantkit.eval.compare import compare_models, decode_tokens_per_s, disk_bytes, linear_storage
    from quantkit.data import eval_windows, load_text, tokenize
    from quantkit.checkpoint.formats import load_model

    _check_positive("--seqlen", seqlen, 1_048_576)
    _check_positive("--max-windows", max_windows)
    paths = ([original] if original else []) + [c for c in checkpoints if c != original]
    models, tok = {}, None
    for p in paths:
        name = p.rstrip("/").split("/")[-1]
        if name in models:
            name = p
        models[name], t = load_model(p)
        tok = tok or t
    ref = next(iter(models))
    windows = eval_windows(tokenize(tok, load_text(dataset, split)), seqlen, max_windows)
    err_console.print(f"evaluating {len(models)} models on {windows.shape[0]} windows of {seqlen} tokens...")
    res = compare_models(models, windows, reference=ref)
    rows = []
    for (name, model), path in zip(models.items(), paths):
        nbytes, nweights = linear_storage(model)
        r = {"name": name, "path": path, "disk_bytes": disk_bytes(path), "bits_per_weight": 8 * nbytes / max(nweights, 1),
             **res[name], "delta_perplexity": res[name]["perplexity"] - res[ref]["perplexity"]}
        if speed:
            r["decode_tokens_per_s"] = decode_tokens_per_s(model)
        rows.append(r)
    if plot:
        _pareto_plot(rows, plot)
    if as_json:
        click.echo(json.dumps({"reference": ref, "dataset": dataset, "windows": int(windows.shape[0]), "seqlen": seqlen,
                               "rows": rows}))
        return
    table = Table("model", "disk MB", "bits/w", "ppl", "delta", "KL", "same top-1", *(["tok/s"] if speed else []),
                  title=f"{dataset} ({windows.shape[0]} x {seqlen} tokens), vs {ref}")
    for r in rows:
        table.add_row(r["name"], f"{r['disk_bytes'] / 1e6:.1f}", f"{r['bits_per_weight']:.2f}", f"{r['perplexity']:.3f}",
                      f"{r['delta_perplexity']:+.3f}", f"{r['kl_divergence']:.4f}", f"{100 * r['same_top1']:.1f}%",
                      *([f"{r['decode_tokens_per_s']:.1f}"] if speed else []))
    Console().print(table)


def _pareto_plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QuantkitError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["disk_bytes"] / 1e6, r["perplexity"])
        ax.annotate(r["name"], (r["disk_bytes"] / 1e6, r["perplexity"]), fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from quantkit.memory import keep_triton_unloaded

    keep_triton_unloaded(sys.argv[1:2])
    cli(prog_name="quantkit")


if __name__ == "__main__":
    main()
