"""The commands that write a compressed checkpoint -- ``quantize``, ``prune``, ``lowrank``, ``run``
and ``distill`` -- and ``methods``.  Each builds a job and hands it to the one runner,
:func:`execute`: check (before any work) -> load -> compress (under a progress bar) -> save ->
report.  quantize, prune and lowrank share :class:`MethodJob` and differ only in their
:class:`Kind`; their method options are generated from the configs of the kind's methods and
their calibration options from ``CalibSpec`` (:mod:`quantkit.cli.options`).
"""

from __future__ import annotations

import dataclasses
import json
import time

import click
from rich.table import Table

from quantkit.cli.common import (device_option, err_console, four_decimals, json_option, load_options, model_options,
                                 out_console, output_options, progress_task, report)
from quantkit.cli.jobs import DistillJob, Kind, MethodJob, RecipeJob
from quantkit.cli.options import GeneratedOptions, calib_options, config_options, method_options
from quantkit.errors import QuantkitError
from quantkit.memory import peak_rss_bytes


def execute(job) -> None:
    """Run ``job`` (see :mod:`quantkit.cli.jobs`) and report what it did."""
    job.check()
    t0 = time.perf_counter()
    job.load()
    with progress_task(job.label, job.as_json, job.total) as update:
        res = job.compress(update)
    job.save(res)
    payload = job.payload(res)
    payload.update(seconds=round(time.perf_counter() - t0, 3), peak_rss_bytes=peak_rss_bytes())
    for k in job.last:  # fields reported after the common ones
        payload[k] = payload.pop(k)
    report(payload, job.keys or tuple(payload), job.title, job.as_json, job.notes(res), job.skip_note, job.fmt)


# ---- the three kinds -------------------------------------------------------------------------
def _quantize_fields(job: MethodJob, res) -> dict:
    """``bits``/``group_size``: the config's (None under a bit budget: each linear has its own);
    ``bits_per_weight``: measured on the packed linears written (None when streamed)."""
    from quantkit.runtime.qlinear import bits_per_weight

    budget = getattr(job.config, "target_bpw", None)
    fields = {"bits": None if budget else getattr(job.config, "bits", None),
              "group_size": None if budget else getattr(job.config, "group_size", None),
              "bits_per_weight": None if job.stream else bits_per_weight(job.m)}
    if budget is not None:
        fields["target_bpw"] = budget
    return {**fields, "modules": len(res.quantized), "stream": job.stream, **_expert_fields(res)}


def _expert_fields(res) -> dict:
    """MoE runs: the calibration tokens routed to each expert (min and max over every block) and
    the experts that fell back for want of them (by name, also in quant_log.csv); printed on stderr too."""
    tokens = res.extra.get("expert_tokens")
    if not tokens:
        return {}
    counts = [c for per_block in tokens.values() for c in per_block]
    starved = sorted({r.module.rsplit(".", 1)[0] for r in res.log if "calibration token(s)" in r.note})
    err_console.print(f"experts: {len(counts)} in {len(tokens)} blocks, {min(counts)} to {max(counts)} calibration tokens "
                      f"routed to each; {len(starved)} fell back for too few" + (f" ({', '.join(starved[:4])}"
                                                                                 f"{', ...' if len(starved) > 4 else ''})" if starved else ""))
    return {"experts": {"count": len(counts), "tokens_min": min(counts), "tokens_max": max(counts), "fell_back": starved}}


def _prune_fields(job: MethodJob, res) -> dict:
    cfg, sp = job.config, res.extra["sparsity"]
    bits = getattr(cfg, "bits", None)
    return {"sparsity": cfg.sparsity, "pattern": cfg.pattern, "packed": cfg.packed, "bits": bits,
            "group_size": getattr(cfg, "group_size", None) if bits else None, "modules": sp["modules"],
            "sparsity_overall": sp["overall"], "sparsity_min": sp["min"], "sparsity_max": sp["max"], **_expert_fields(res)}


def _prune_check(method: str, options: dict) -> None:
    if "sparsity" in options and "pattern" in options:
        raise QuantkitError("give --sparsity or --pattern, not both")


def _lowrank_fields(job: MethodJob, res) -> dict:
    """The --json fields of a low-rank run; prints the parameter summary on stderr."""
    cfg, s = job.config, res.extra["lowrank"]
    ranks = list(s["ranks"].values())
    err_console.print(f"factorized {s['modules']} linears ({s['left_dense']} left dense): parameters kept "
                      f"{s['params_after']}/{s['params_before']} = {s['ratio']:.4f} of the factorized layers, "
                      f"{s['ratio_linears']:.4f} of all block linears, {s['ratio_model']:.4f} of the model")
    return {"ratio_target": cfg.ratio, "rank": cfg.rank, "energy": cfg.energy, "modules": s["modules"],
            "left_dense": s["left_dense"], "rank_min": min(ranks) if ranks else None,
            "rank_max": max(ranks) if ranks else None, "params_before": s["params_before"],
            "params_after": s["params_after"], "param_ratio": s["ratio"], "param_ratio_linears": s["ratio_linears"],
            "model_params_before": s["model_params_before"], "model_params_after": s["model_params_after"],
            "param_ratio_model": s["ratio_model"]}


def _lowrank_check(method: str, options: dict) -> None:
    """One way to choose the rank; the options only some low-rank methods take name them."""
    from quantkit.api import get_method, method_names

    chosen = [k for k in ("ratio", "rank", "energy") if k in options]
    if len(chosen) > 1:
        raise QuantkitError(f"give one of --ratio, --rank and --energy, not {' and '.join('--' + k for k in chosen)}")
    takes = {n: {f.name for f in dataclasses.fields(get_method(n).config_cls)} for n in method_names("lowrank")}
    foreign = [k for k in options if k not in takes[method]]
    if foreign:
        takers = [n for n, names in takes.items() if set(foreign) <= names]
        raise QuantkitError(f"{', '.join('--' + k for k in foreign)} only apply to --method {' or '.join(takers)}")


QUANTIZE = Kind("quantize", default="gptq", noun=None, fields=_quantize_fields, pack=True, last=("modules", "stream"),
                keys=("output", "method", "bits", "group_size", "bits_per_weight", "modules", "bytes_before", "bytes_after", "seconds",
                      "peak_rss_bytes"))
PRUNE = Kind("prune", default="sparsegpt", noun="pruning", fields=_prune_fields, check=_prune_check,
             fmt=four_decimals("sparsity"))
LOWRANK = Kind("lowrank", default="asvd", noun="low-rank", fields=_lowrank_fields, check=_lowrank_check,
               fmt=four_decimals("param_ratio"), skip_note=lambda note: note.startswith("rank "),
               extra_config=lambda res: {"lowrank": {k: res.extra["lowrank"][k] for k in
                                                     ("params_before", "params_after", "ratio", "ratio_model")}})


def _distill_options():
    from quantkit.distill import DistillConfig

    return config_options(DistillConfig)


def _method_command(kind: Kind):
    """A command of ``kind``: its method options (then the calibration options) come after --method."""
    return click.command(kind.name, cls=GeneratedOptions, after="method",
                         generate=lambda: method_options(kind.name, kind.default) + calib_options())


# ---- the commands ----------------------------------------------------------------------------
@_method_command(QUANTIZE)
@click.argument("model")
@click.option("--method", default=QUANTIZE.default, show_default=True, help="Compression method (see `quantkit methods`).")
@click.option("--stream/--no-stream", default=None,
              help="Read a safetensors MODEL one block at a time from disk (memory: about one block), resumable "
                   "[default: when its weights exceed half the available memory].")
@click.option("--resume", is_flag=True, help="Continue the --stream run that was killed writing OUTPUT (implies --stream).")
@click.option("--offload-activations", "offload", default=None, metavar="DIR",
              help="Keep calibration activations in files under DIR (with --stream they are always in files, by default beside OUTPUT).")
@output_options
@model_options
@device_option
@click.pass_context
def quantize(ctx, **params):
    """Quantize MODEL (a directory, .gguf file or hub id) and write a packed checkpoint.
    With --stream the overwrite check covers an unfinished run of OUTPUT too."""
    execute(MethodJob(QUANTIZE, ctx))


@_method_command(PRUNE)
@click.argument("model")
@click.option("--method", default=PRUNE.default, show_default=True, help="sparsegpt, wanda or magnitude (see `quantkit methods`).")
@output_options
@model_options
@device_option
@click.pass_context
def prune(ctx, **params):
    """Prune MODEL's linears (unstructured or N:M) and write a checkpoint: dense with zeros
    (plain transformers loads it), packed N:M with --packed, or quantized with --bits."""
    execute(MethodJob(PRUNE, ctx))


@_method_command(LOWRANK)
@click.argument("model")
@click.option("--method", default=LOWRANK.default, show_default=True,
              help="asvd (activation-aware: SVD-LLM whitening, or ASVD scaling with --scaling act) or svd (plain).")
@output_options
@model_options
@device_option
@click.pass_context
def lowrank(ctx, **params):
    """Factorize MODEL's linears into two low-rank linears (W ~= V U) and write a checkpoint whose
    config records each module's rank; a layer is factorized only where that saves parameters."""
    execute(MethodJob(LOWRANK, ctx))


@click.command(name="run")
@click.argument("recipe")
@click.argument("model")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe value, e.g. steps.0.bits=3.")
@output_options
@model_options
@device_option
def run_cmd(**params):
    """Run the steps of a YAML RECIPE on MODEL and write the result (the recipe is validated first)."""
    execute(RecipeJob(params))


@click.command(cls=GeneratedOptions, after="output", generate=lambda: _distill_options())
@click.option("--teacher", required=True, help="The original model (directory, .gguf file or hub id).")
@click.option("--student", required=True, help="The model to train: a compressed checkpoint or a smaller model sharing the tokenizer.")
@output_options
@load_options
def distill(**params):
    """Recover STUDENT by knowledge distillation from TEACHER (KL on softened logits, optional
    hidden-state MSE), on the CPU; sparsity masks, ranks and quantization grids are preserved, and
    OUTPUT is in the student's format."""
    execute(DistillJob(params))


@click.command()
@json_option
def methods(as_json):
    """List the registered compression methods and their options."""
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
    out_console().print(table)
