"""``eval perplexity``, ``compare`` and ``bench``: how good and how fast a float or packed model is.
The measuring lives in :mod:`quantkit.eval`; these commands parse, check, load and print."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import click
from rich.table import Table

from quantkit.cli.common import (check_positive, device_option, err_console, json_option, kv_cache_options,
                                 model_options, out_console, progress_task)
from quantkit.errors import QuantkitError

BACKEND_CHOICE = click.Choice(["auto", "reference", "cpu", "triton"])


@click.group(name="eval")
def eval_group():
    """Evaluate a float or packed model."""


@eval_group.command()
@click.argument("model")
@click.option("--dataset", default="wikitext2", show_default=True, help="A dataset name or a local text file.")
@click.option("--split", default="test", show_default=True)
@click.option("--seqlen", type=int, default=2048, show_default=True)
@click.option("--max-windows", type=int, default=None, help="Evaluate only the first N windows.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--backend", type=BACKEND_CHOICE, default=None, help="Kernel path for packed weights (default: auto).")
@kv_cache_options
@json_option
@model_options
@device_option
def perplexity(model, dataset, split, seqlen, max_windows, batch_size, backend, kv_bits, kv_keys, as_json, dtype,
               allow_pickle, trust_remote_code, device):
    """Perplexity of MODEL (GPTQ protocol: non-overlapping windows, mean NLL of every predicted token)."""
    from quantkit.data import check_context, eval_windows, load_text, tokenize
    from quantkit.checkpoint.formats import load_model
    from quantkit.devices import resolve_device
    from quantkit.runtime.backends import use_backend

    check_positive("--seqlen", seqlen, 1_048_576)
    check_positive("--max-windows", max_windows)
    check_positive("--batch-size", batch_size)
    with use_backend(backend) if backend else contextlib.nullcontext():
        m, tok = load_model(model, dtype=dtype, device=resolve_device(device), allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code)
        check_context(seqlen, m.config)
        windows = eval_windows(tokenize(tok, load_text(dataset, split)), seqlen, max_windows)
        res, running = _perplexity(m, windows, batch_size, kv_bits, kv_keys, as_json)
    res["dataset"] = dataset
    if as_json:
        click.echo(json.dumps(res))
        return
    click.echo(",".join(running))
    click.echo(f"Final estimate: PPL = {res['perplexity']:.4f} +/- {res['stderr']:.5f}  "
               f"({res['windows']} windows x {seqlen} tokens, {res['tokens']} scored, {res['seconds']:.1f} s)")
    if kv_bits:
        click.echo(f"KV cache int{kv_bits} ({res['kv_keys']} scales): {res['kv_bytes_per_token']:.0f} bytes/token "
                   f"vs {res['kv_bytes_per_token_fp16']:.0f} in fp16")


def _perplexity(m, windows, batch_size: int, kv_bits: str | None, kv_keys: str, as_json: bool) -> tuple[dict, list[str]]:
    """``(result, running estimates "[i]ppl")`` of ``m`` on ``windows``, through an int8/int4 KV
    cache with ``kv_bits``."""
    from quantkit.eval.perplexity import perplexity as ppl_fn
    from quantkit.runtime.kvcache import KVCachedLM, kv_bytes_per_token, kv_config

    kv = kv_config(int(kv_bits), kv_keys, m) if kv_bits else None
    running = []
    with progress_task("perplexity", as_json, total=windows.shape[0]) as update:
        def report(i, n, ppl):
            running.append(f"[{i}]{ppl:.4f}")
            update(i, info=f"ppl {ppl:.4f}")

        res = ppl_fn(KVCachedLM(m, kv) if kv else m, windows, batch_size, report)
    if kv:
        res.update(kv_bits=kv.bits, kv_keys="rotated" if kv.rotate else kv.keys, kv_bytes_per_token=kv_bytes_per_token(m.config, kv),
                   kv_bytes_per_token_fp16=kv_bytes_per_token(m.config, None, 2))
    return res, running


@eval_group.command()
@click.argument("model")
@click.option("--tasks", required=True, help="Comma-separated lm-evaluation-harness task names (online: the harness "
              "fetches their data), local task YAML files, or the shipped offline task tinystories_mc.")
@click.option("--limit", type=int, default=None, help="Score only the first N examples of each task.")
@click.option("--num-fewshot", type=int, default=None, help="Few-shot examples (default: each task's own).")
@click.option("--backend", type=BACKEND_CHOICE, default=None, help="Kernel path for packed weights (default: auto).")
@json_option
@model_options
@device_option
def tasks(model, tasks, limit, num_fewshot, backend, as_json, dtype, allow_pickle, trust_remote_code, device):
    """Task accuracy of MODEL through lm-evaluation-harness, scored by quantkit's runtime (a packed
    checkpoint runs on its own kernels)."""
    from quantkit.checkpoint.formats import load_model
    from quantkit.devices import resolve_device
    from quantkit.eval.tasks import local_task, require_harness, run_tasks
    from quantkit.runtime.backends import use_backend

    check_positive("--limit", limit)
    require_harness()
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    for t in names:
        local_task(t)  # a bad task file is refused before the model loads
    with use_backend(backend) if backend else contextlib.nullcontext():
        m, tok = load_model(model, dtype=dtype, device=resolve_device(device), allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code)
        scores = run_tasks(m, tok, names, limit=limit, num_fewshot=num_fewshot)
    if as_json:
        click.echo(json.dumps({"model": model, "tasks": scores}))
        return
    table = Table("task", "metric", "value", title=f"{model}")
    for task, metrics in scores.items():
        for k, v in metrics.items():
            table.add_row(task, k, f"{v:.4f}")
    out_console().print(table)


@click.command()
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--original", default=None, help="The uncompressed model (default: the first CHECKPOINT).")
@click.option("--dataset", default="wikitext2", show_default=True)
@click.option("--split", default="test", show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--max-windows", type=int, default=8, show_default=True)
@click.option("--speed/--no-speed", default=True, show_default=True, help="Also time greedy decoding.")
@click.option("--plot", default=None, help="Write a size-vs-perplexity Pareto plot (PNG, needs matplotlib).")
@click.option("--tasks", "task_names", default=None, help="Also score these tasks (see `quantkit eval tasks`): a column each.")
@click.option("--task-limit", type=int, default=None, help="With --tasks: the first N examples of each.")
@json_option
def compare(checkpoints, original, dataset, split, seqlen, max_windows, speed, plot, task_names, task_limit, as_json):
    """Evaluate CHECKPOINTS and the original side by side: size, bits/weight, perplexity, KL, tok/s."""
    from quantkit.data import eval_windows, load_text, tokenize
    from quantkit.eval.compare import compare_models

    check_positive("--seqlen", seqlen, 1_048_576)
    check_positive("--max-windows", max_windows)
    if plot and importlib.util.find_spec("matplotlib") is None:  # before the evaluation, not after it
        raise QuantkitError("--plot needs matplotlib: pip install 'quantkit[plot]' (or matplotlib)")
    if task_names:
        from quantkit.eval.tasks import local_task, require_harness

        require_harness()
        for t in task_names.split(","):
            if t.strip():
                local_task(t.strip())
    paths = ([original] if original else []) + [c for c in checkpoints if c != original]
    models, tok = _load_all(paths)
    ref = next(iter(models))
    windows = eval_windows(tokenize(tok, load_text(dataset, split)), seqlen, max_windows)
    err_console.print(f"evaluating {len(models)} models on {windows.shape[0]} windows of {seqlen} tokens...")
    rows = _compare_rows(models, paths, compare_models(models, windows, reference=ref), ref, speed)
    names = [t.strip() for t in (task_names or "").split(",") if t.strip()]
    if names:
        from quantkit.eval.tasks import run_tasks

        for r, m in zip(rows, models.values()):
            r["tasks"] = run_tasks(m, tok, names, limit=task_limit)
    if plot:
        _pareto_plot(rows, plot)
    if as_json:
        click.echo(json.dumps({"reference": ref, "dataset": dataset, "windows": int(windows.shape[0]), "seqlen": seqlen,
                               "rows": rows}))
        return
    task_cols = [(t, next(iter(ms))) for t, ms in rows[0].get("tasks", {}).items() if ms]  # each task's first metric
    table = Table("model", "disk MB", "bits/w", "ppl", "delta", "KL", "same top-1", *(["tok/s"] if speed else []),
                  *(f"{t} {k}" for t, k in task_cols), title=f"{dataset} ({windows.shape[0]} x {seqlen} tokens), vs {ref}")
    for r in rows:
        table.add_row(r["name"], f"{r['disk_bytes'] / 1e6:.1f}", f"{r['bits_per_weight']:.2f}", f"{r['perplexity']:.3f}",
                      f"{r['delta_perplexity']:+.3f}", f"{r['kl_divergence']:.4f}", f"{100 * r['same_top1']:.1f}%",
                      *([f"{r['decode_tokens_per_s']:.1f}"] if speed else []),
                      *(f"{r['tasks'][t][k]:.4f}" for t, k in task_cols))
    out_console().print(table)


def _load_all(paths: list[str]) -> tuple[dict, object]:
    """``({name: model}, the first tokenizer)``; a name is the path's base name, or the path where two clash."""
    from quantkit.checkpoint.formats import load_model

    models, tok = {}, None
    for p in paths:
        name = p.rstrip("/").split("/")[-1]
        if name in models:
            name = p
        models[name], t = load_model(p)
        tok = tok or t
    return models, tok


def _compare_rows(models: dict, paths: list[str], res: dict, ref: str, speed: bool) -> list[dict]:
    from quantkit.eval.compare import decode_tokens_per_s, disk_bytes, linear_storage

    rows = []
    for (name, model), path in zip(models.items(), paths):
        nbytes, nweights = linear_storage(model)
        r = {"name": name, "path": path, "disk_bytes": disk_bytes(path), "bits_per_weight": 8 * nbytes / max(nweights, 1),
             **res[name], "delta_perplexity": res[name]["perplexity"] - res[ref]["perplexity"]}
        if speed:
            r["decode_tokens_per_s"] = decode_tokens_per_s(model)
        rows.append(r)
    return rows


def _series(path: str) -> str:
    """A compare row's series in the plot: a checkpoint written under a bit budget, or a uniform format."""
    from quantkit.checkpoint.packed import ALLOCATION_FILE

    return "--target-bpw" if (Path(path) / ALLOCATION_FILE).is_file() else "uniform formats"


def _pareto_plot(rows: list[dict], path: str) -> None:
    """Size against perplexity, each series' Pareto front drawn (budget allocations vs uniform formats)."""
    from quantkit.eval.compare import pareto_front

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QuantkitError("--plot needs matplotlib: pip install 'quantkit[plot]' (or matplotlib)") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [{**r, "mb": r["disk_bytes"] / 1e6} for r in rows]
    for series in sorted({_series(r["path"]) for r in points}):
        members = [r for r in points if _series(r["path"]) == series]
        front = pareto_front(members, "mb", "perplexity")
        ax.scatter([r["mb"] for r in members], [r["perplexity"] for r in members], label=series)
        ax.plot([r["mb"] for r in front], [r["perplexity"] for r in front], alpha=0.6)
    for r in points:
        ax.annotate(r["name"], (r["mb"], r["perplexity"]), fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command("bench")
@click.argument("model_path", metavar="MODEL")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="bfloat16", show_default=True,
              help="Activation/float-weight dtype (CPU low-bit ops are fast in bf16).")
@click.option("--prompt-len", type=click.IntRange(1), default=128, show_default=True)
@click.option("--gen-len", type=click.IntRange(1), default=64, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--repeat", type=click.IntRange(1), default=5, show_default=True)
@click.option("--backend", type=BACKEND_CHOICE, default=None,
              help="Force the quantized-matmul path (default: $QUANTKIT_BACKEND, else by device).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the decode step (slow to start; transformers' forward).")
@click.option("--lean/--no-lean", default=True, show_default=True,
              help="Run Llama/Mistral/Qwen2/Qwen3/Gemma 1-3 models with quantkit's lean forward (fewer ops per step; "
                   "others always use transformers').")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads (default: torch's, one per core); 1 is steadier on a busy machine.")
@device_option
@json_option
def bench(model_path, dtype, prompt_len, gen_len, batch, repeat, backend, compile_, lean, threads, device, as_json):
    """Prefill/decode tokens per second, time to first token, memory and decode roofline of MODEL
    (see quantkit.eval.speed)."""
    import torch

    from quantkit.eval.speed import bench_table, run_bench
    from quantkit.checkpoint.formats import load_model
    from quantkit.devices import resolve_device
    from quantkit.runtime.backends import use_backend

    device = resolve_device(device)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with use_backend(backend) if backend else contextlib.nullcontext():
            model, _ = load_model(model_path, dtype=dtype, device=device, with_tokenizer=False)
            r = run_bench(model, prompt_len=prompt_len, gen_len=gen_len, batch=batch, repeat=repeat, compile=compile_,
                          lean=lean)
    finally:
        torch.set_num_threads(previous_threads)
    r["model"] = model_path
    if as_json:
        click.echo(json.dumps(r))
    else:
        out_console().print(bench_table([(os.path.basename(model_path.rstrip("/")), r)]))
