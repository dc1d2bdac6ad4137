"""``quantkit generate`` and ``quantkit serve``: a quick look at a model, and an OpenAI-compatible
HTTP server over it (:mod:`quantkit.serve`).  torch, transformers and FastAPI are imported when a
command runs, so ``quantkit --help`` stays fast."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys

import click

from quantkit.cli.common import device_option, kv_cache_options
from quantkit.errors import QuantkitError

API_KEY_ENV = "QUANTKIT_API_KEY"  # serve's --api-key when the option is not given (as vLLM reads VLLM_API_KEY)


def kv_cache_factory(kv_bits: str | None, kv_keys: str | None):
    """None (a float cache), or ``model -> QuantizedKVCache`` for ``--kv-bits``."""
    if not kv_bits:
        return None
    from quantkit.runtime.kvcache import QuantizedKVCache, kv_config

    return lambda model: QuantizedKVCache.for_model(model, kv_config(int(kv_bits), kv_keys, model))


@click.command("generate")
@click.argument("model_path", metavar="MODEL")
@click.argument("prompt")
@click.option("--max-new-tokens", default=128, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", default=0.0, show_default=True,
              help="0 means greedy, and so does any temperature too small to sample with (below 1e-5).")
@click.option("--top-k", default=0, show_default=True, help="Keep the k likeliest tokens (0: off).")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass (1: off).")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user message in the tokenizer's chat template.")
@click.option("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's).")
@kv_cache_options
@click.option("--lean/--no-lean", default=True, show_default=True,
              help="quantkit's lean forward for Llama/Mistral/Qwen2/Qwen3/Gemma 1-3 (one native call per token for int4 "
                   "checkpoints on a CPU); --no-lean: transformers' forward.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@device_option
def generate_command(model_path, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat, dtype, kv_bits,
                     kv_keys, lean, as_json, device):
    """Generate text from MODEL for PROMPT (a quick look at a model)."""
    from quantkit.runtime.generate import SamplingParams, encode_chat, encode_prompt, generate, stream_generate
    from quantkit.checkpoint.formats import load_model
    from quantkit.devices import resolve_device

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop=stop, seed=seed)
    model, tokenizer = load_model(model_path, dtype=dtype, device=resolve_device(device))
    cache = kv_cache_factory(kv_bits, kv_keys)
    if chat:
        prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    else:
        prompt_ids = encode_prompt(tokenizer, prompt)
    if as_json:
        g = generate(model, tokenizer, prompt_ids, params, cache=cache, lean=lean)
        click.echo(json.dumps({"text": g.text, "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens,
                               "completion_tokens": g.completion_tokens, "seconds": round(g.seconds, 4),
                               "tokens_per_s": round(g.completion_tokens / max(g.seconds, 1e-9), 2)}))
        return
    for piece in stream_generate(model, tokenizer, prompt_ids, params, cache=cache, lean=lean):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _require_server_deps() -> None:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise QuantkitError(f"quantkit serve needs {' and '.join(missing)}: pip install quantkit[serve]")


def server_options(f):
    """Who may call the server and how long connections may idle (:mod:`quantkit.serve.security`,
    :mod:`quantkit.serve.timeouts`)."""
    options = [
        click.option("--api-key", envvar=API_KEY_ENV, default=None, show_envvar=True, metavar="KEY",
                     help="Require 'Authorization: Bearer KEY' on every route but /health and /metrics "
                          "(the variable keeps the key off the process list)."),
        click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
                     help="Browser origin allowed to call the API, e.g. http://localhost:3000, or '*' (repeatable); "
                          "requests from other origins are refused (403)."),
        click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="HOST",
                     help="Host header value to accept besides localhost/127.0.0.1/[::1] when bound to a loopback "
                          "address (repeatable; '*': any). Bound elsewhere, only these are checked."),
        click.option("--timeout-keep-alive", type=click.IntRange(1, 3600), default=5, show_default=True,
                     help="Seconds an idle keep-alive connection stays open after a response."),
        click.option("--timeout-header", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True,
                     help="Seconds a client has to send a whole request head before its connection is closed."),
        click.option("--limit-concurrency", type=click.IntRange(1, 1_000_000), default=512, show_default=True,
                     help="Open connections (or requests in progress) beyond which new requests get 503."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command("serve")
@click.argument("model_path", metavar="MODEL")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--model-name", default=None, help="Name clients use in 'model' (default: MODEL's base name).")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Sequences decoded together.")
@click.option("--max-queue", type=click.IntRange(0, 100_000), default=64, show_default=True,
              help="Requests waiting for a slot before the server answers 503.")
@click.option("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="torch intra-op threads (default: torch's choice).")
@kv_cache_options
@click.option("--lean/--no-lean", default=True, show_default=True,
              help="Decode batches on quantkit's lean forward (what `generate` runs; Llama/Mistral/Qwen2/Qwen3/Gemma 1-3 "
                   "without --kv-bits); --no-lean: transformers' forward over a padded cache.")
@server_options
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@device_option
def serve_command(model_path, host, port, model_name, max_batch, max_queue, dtype, threads, kv_bits, kv_keys,
                  lean, api_key, cors_origins, allowed_hosts, timeout_keep_alive, timeout_header, limit_concurrency,
                  log_level, device):
    """Serve MODEL over an OpenAI-compatible HTTP API (completions, chat, streaming).

    Bound to a loopback address (the default), it answers only requests whose Host header names this
    machine; browsers may call it only from the --cors-origin origins; with --api-key (or
    $QUANTKIT_API_KEY) every route but /health and /metrics needs the key."""
    _require_server_deps()
    import torch
    import uvicorn

    from quantkit.checkpoint.formats import load_model
    from quantkit.devices import resolve_device
    from quantkit.serve.app import create_app
    from quantkit.serve.engine import Engine
    from quantkit.serve.security import Security
    from quantkit.serve.timeouts import with_head_timeout

    checks = Security.for_bind(host, api_key, cors_origins, allowed_hosts)  # bad values refused before loading
    device = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    model, tokenizer = load_model(model_path, dtype=dtype, device=device)
    name = model_name or os.path.basename(os.path.normpath(model_path))
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, cache=kv_cache_factory(kv_bits, kv_keys),
                    lean=lean)
    app = create_app(engine, name, checks)
    click.echo(f"serving {name} on http://{host}:{port}/v1 ({engine.runtime} forward, max batch {max_batch}, "
               f"queue {max_queue}"
               f"{', API key required' if api_key else ''})", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                http=with_head_timeout(timeout_header), timeout_keep_alive=timeout_keep_alive,
                limit_concurrency=limit_concurrency)
