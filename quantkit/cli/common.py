"""What the commands share: the stderr console and progress bar, how results are printed, the
checks made before any work, and the option groups several commands take.  Light: no torch."""

from __future__ import annotations

import contextlib
import json
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from quantkit.errors import QuantkitError

err_console = Console(stderr=True)


def out_console() -> Console:
    """Where tables go (stdout): a terminal's own width there; piped or redirected, as wide as each
    table needs (rich would otherwise cut names at 80 columns: ``rtn-g32-sym`` and ``rtn-g32-asym``
    both as ``rtn-g32-…``)."""
    return Console() if sys.stdout.isatty() else Console(width=100_000)


# ---- progress and results -------------------------------------------------------------------
@contextlib.contextmanager
def progress_task(description: str, as_json: bool, total: int | None = None):
    """A progress bar on stderr (hidden under ``--json`` unless stderr is a terminal); yields
    ``update(completed, total=None, info="", description=None)`` (None: left as it was).

        >>> with progress_task("gptq", as_json=False) as update:   # doctest: +SKIP
        ...     update(3, 30, "layer 3")
    """
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                  disable=as_json and not sys.stderr.isatty(), transient=False) as prog:
        task = prog.add_task(description, total=total, info="")
        yield lambda completed, total=None, info="", description=None: prog.update(
            task, completed=completed, total=total, info=info, description=description)


def emit(as_json: bool, payload: dict, table: Table | None = None) -> None:
    """``payload`` as one JSON line under ``--json``, else ``table`` (if any) on stdout."""
    if as_json:
        click.echo(json.dumps(payload))
    elif table is not None:
        out_console().print(table)


def report(payload: dict, keys, title: str, as_json: bool, log=(), skip_note=lambda note: False,
           fmt=lambda k, v: str(v)) -> None:
    """Print the notes of ``log`` (stderr), then ``payload`` as JSON or as a two-column table of ``keys``."""
    for r in log:
        if r.note and not skip_note(r.note):
            err_console.print(f"[yellow]note[/] {r.module}: {r.note}")
    table = Table(title=title, show_header=False)
    for k in keys:
        table.add_row(k, fmt(k, payload[k]))
    emit(as_json, payload, table)


def four_decimals(*prefixes: str):
    """A ``fmt`` for :func:`report`: floats of keys starting with ``prefixes`` with 4 decimals."""
    return lambda k, v: f"{v:.4f}" if isinstance(v, float) and k.startswith(prefixes) else str(v)


# ---- checks before any work -----------------------------------------------------------------
def check_positive(name: str, value: int | None, upper: int | None = None) -> None:
    if value is None:
        return
    if value < 1 or (upper is not None and value > upper):
        raise QuantkitError(f"{name} must be between 1 and {upper}, got {value}" if upper else f"{name} must be positive, got {value}")


def check_output(output: str, overwrite: bool, inputs=()) -> None:
    """Before any work: :func:`quantkit.checkpoint.output.check_output`, the one rule (imported when a
    command runs, so that ``import quantkit.cli`` stays free of torch); ``inputs``: the paths the
    command reads, which OUTPUT must neither be nor hold."""
    from quantkit.checkpoint.output import check_output as rule

    rule(output, overwrite, inputs)


# ---- option groups ---------------------------------------------------------------------------
def load_options(f):
    """``--allow-pickle`` and ``--trust-remote-code``: how a model may be loaded."""
    f = click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) weights.")(f)
    f = click.option("--trust-remote-code", is_flag=True, help="Run model code shipped with the checkpoint.")(f)
    return f


def model_options(f):
    """:func:`load_options` and ``--dtype``."""
    f = click.option("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's).")(f)
    return load_options(f)


def device_option(f):
    """``--device auto|cpu|cuda`` (see :func:`quantkit.devices.resolve_device`)."""
    return click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                        help="Where the work runs: cuda (a GPU: the Triton kernels; compressing, one block at a time "
                             "on it while the model waits in CPU memory), cpu, or auto: cuda when PyTorch sees a GPU.")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(f)


def output_options(f):
    """``-o/--output``, ``--overwrite`` and ``--json``: every command that writes a checkpoint."""
    f = json_option(f)
    f = click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists and quantkit wrote it.")(f)
    f = click.option("-o", "--output", "output", required=True, help="Output directory (written atomically).")(f)
    return f


def kv_cache_options(f):
    """``--kv-bits`` / ``--kv-keys``: an int8/int4 KV cache (quantkit.runtime.kvcache), shared by
    ``generate``, ``serve`` and ``eval perplexity``."""
    f = click.option("--kv-keys", type=click.Choice(["token", "channel", "rotated"]), default=None,
                     help="KV-cache scales: per token and head, per channel over groups of 64 tokens for keys (KIVI), "
                          "or per token after a Hadamard transform of each head (QuaRot) "
                          "[default: rotated for a checkpoint quantized with --rotate, else token].")(f)
    return click.option("--kv-bits", type=click.Choice(["8", "4"]), default=None,
                        help="Keep the KV cache in int8/int4 (transformers' forward; see quantkit.runtime.kvcache).")(f)
