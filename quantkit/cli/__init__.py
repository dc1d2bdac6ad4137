"""The ``quantkit`` command line (click + rich).

Every user error is one line on stderr and exit code 1; ``--json`` prints one JSON object on
stdout; progress goes to stderr.  The commands live by what they do: :mod:`~quantkit.cli.compress`
(quantize, prune, lowrank, run, distill, methods), :mod:`~quantkit.cli.evaluate` (eval perplexity,
compare, bench), :mod:`~quantkit.cli.export`, :mod:`~quantkit.cli.serve` (generate, serve).  What
they share (progress bar, output, checks, option groups) is in :mod:`~quantkit.cli.common`; the
method and calibration options are generated from the configs (:mod:`~quantkit.cli.options`).
Importing the command line imports no torch, so ``quantkit --help`` is fast.
"""

from __future__ import annotations

import os
import sys

import click

from quantkit.cli import compress, evaluate, export, serve
from quantkit.errors import QuantkitError, os_reason


class _Group(click.Group):
    """Turns QuantkitError (and stray exceptions) into one-line click errors: ``Error: ...`` on
    stderr, exit code 1."""

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
            reason = os_reason(e) if isinstance(e, OSError) else None
            if reason:  # disk full, read-only, size limit...: the environment's fault, said in plain words
                raise click.ClickException(f"{e.filename}: {reason}" if e.filename else reason) from None
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise click.ClickException(f"internal error: {type(e).__name__}: {msg} (set QUANTKIT_DEBUG=1 for a traceback)") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quantkit")
def cli():
    """quantkit: compress Hugging Face causal LMs (GPTQ, AWQ, SmoothQuant, pruning, low-rank) and run them."""


for _command in (compress.quantize, compress.prune, compress.lowrank, compress.distill, compress.run_cmd, export.export,
                 evaluate.eval_group, compress.methods, serve.generate_command, serve.serve_command, evaluate.bench,
                 evaluate.compare):
    cli.add_command(_command)


def main() -> None:
    from quantkit.memory import keep_triton_unloaded

    keep_triton_unloaded(sys.argv[1:2])
    cli(prog_name="quantkit")
