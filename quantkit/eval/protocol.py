"""The measurement protocol every results table shares (the peers' anchors' protocol, see
../shared/ANCHORS.md): calibrate on ``--calib`` with ``--nsamples x --calib-seqlen`` tokens
(seed 0), evaluate perplexity on the first ``--max-windows`` windows of ``--seqlen`` tokens of
the ``--dataset`` test split.  Written once here so the tables stay comparable.

    >>> ap = argparse.ArgumentParser(); add_protocol_args(ap)
    >>> setup = load_protocol(ap.parse_args(["--model", "path/to/model"]))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.data import calibration_samples, eval_windows, load_text, tokenize
from quantkit.checkpoint.formats import load_model


def add_protocol_args(ap: argparse.ArgumentParser, *, nsamples: int = 64) -> None:
    """``--model`` and the calibration/evaluation options, with the protocol's defaults."""
    ap.add_argument("--model", required=True, help="HF directory, hub id or .gguf file.")
    ap.add_argument("--calib", default="c4", help="Calibration data (name or file).")
    ap.add_argument("--nsamples", type=int, default=nsamples, help="Calibration windows.")
    ap.add_argument("--calib-seqlen", type=int, default=512, help="Tokens per calibration window.")
    ap.add_argument("--dataset", default="wikitext2", help="Evaluation data (its test split).")
    ap.add_argument("--seqlen", type=int, default=512, help="Tokens per evaluation window.")
    ap.add_argument("--max-windows", type=int, default=16, help="Evaluation windows (the first N).")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")


@dataclass
class Protocol:
    model: torch.nn.Module  # the float original, never mutated by the tables (they deep-copy it)
    tokenizer: object
    windows: torch.Tensor  # [n, seqlen] evaluation windows
    calib: torch.Tensor  # [nsamples, calib_seqlen] calibration ids


def load_protocol(args: argparse.Namespace) -> Protocol:
    """Load the model once and cut the evaluation and calibration windows."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    windows = eval_windows(tokenize(tok, load_text(args.dataset, "test")), args.seqlen, args.max_windows)
    calib = calibration_samples(tok, args.calib, args.nsamples, args.calib_seqlen, seed=0)
    return Protocol(model, tok, windows, calib)


def write_results(args: argparse.Namespace, title: str, text: str, results: dict) -> None:
    """Print a table script's markdown ``text``, write it under ``# title`` to ``args.out`` and,
    with ``args.json_out``, ``results`` as JSON."""
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(f"# {title}\n\n" + text)
    if getattr(args, "json_out", None):
        Path(args.json_out).write_text(json.dumps(results, indent=2))
