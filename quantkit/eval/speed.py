"""What ``quantkit bench`` measures: prefill and decode throughput, time to first token, memory, and the
decode roofline, for float and packed models alike.

Decode on a CPU is bound by memory traffic: every new token reads every weight once.  The
roofline is ``bandwidth / bytes read per token``.  The bandwidth is measured the way decode
runs: on the same number of threads (``torch.get_num_threads()``), as the best of several
float32 sums over a 512 MiB tensor (16x this machine's 32 MiB L3), once per timing round so a
busy moment does not set it.  The bytes are summed over what the chosen kernels actually read
(a ``QuantLinear``'s converted layout, a float ``Linear``'s weight, one row of each embedding;
the KV cache is not counted, it is small next to the weights for short contexts).
``roofline_fraction`` = decode tokens/s x bytes per token / bandwidth.

    >>> r = run_bench(model, prompt_len=64, gen_len=32, repeat=3)     # doctest: +SKIP
    >>> r["decode_tokens_per_s"], r["roofline_fraction"]              # doctest: +SKIP

Timing: a static KV cache, greedy tokens, ``torch.inference_mode``; one untimed warm-up run
(it also converts packed weights to the kernel layout); then ``repeat`` runs, reported as
mean and standard deviation.  Prefill = one forward over the prompt (logits of the last
position only) plus the argmax: that is also the time to first token.  Decode = ``gen_len``
single-token forwards.  The command is in :mod:`quantkit.cli.evaluate`; torch is imported inside
the functions so ``quantkit --help`` stays fast.
"""

from __future__ import annotations

import resource
import statistics
import time

BANDWIDTH_BYTES = 512 * 2**20


# ---- machine and model facts ----------------------------------------------------------------
def measure_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeat: int = 5, device="cpu") -> float:
    """Read bandwidth in bytes/s where decode runs (on a CPU, the current ``torch.get_num_threads()``
    threads): the best of ``repeat`` float32 sums over an ``nbytes`` tensor, far larger than the caches."""
    import torch

    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t = torch.ones(nbytes // 4, device=device)
    t.sum()  # touch the pages
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        t.sum()
        sync()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def weight_bytes(model) -> int:
    """Bytes of all parameters and buffers (tied tensors once): the model's size."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def decode_bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: linears in full (a ``QuantLinear`` counted in its
    kernel layout, a tied lm_head once), one row per embedding, norms and the like in full."""
    from torch import nn

    from quantkit.runtime.backends import kernel_weight_bytes

    seen, total = set(), 0
    for m in model.modules():
        if hasattr(m, "qweight") and hasattr(m, "_backend"):  # QuantLinear
            total += kernel_weight_bytes(m)
        elif isinstance(m, nn.Embedding):
            total += m.embedding_dim * m.weight.element_size()
        else:
            for p in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                if p.data_ptr() not in seen:
                    seen.add(p.data_ptr())
                    total += p.numel() * p.element_size()
    return total


def peak_memory_bytes(device) -> int:
    """CUDA: peak allocated; CPU: the process's peak resident set (it includes loading)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# ---- timing ---------------------------------------------------------------------------------
def time_generation(model, prompt_ids, gen_len: int, step=None, lean=None) -> tuple[float, float]:
    """``(prefill seconds, decode seconds)`` for one greedy generation with a static cache.

    ``prompt_ids [batch, prompt_len]``; ``step`` (default ``model``) runs each decode forward,
    e.g. a ``torch.compile``'d ``model.forward``; ``lean``: a :class:`~quantkit.runtime.lean.LeanLM`
    of ``model`` runs prefill and decode instead of transformers' forward.
    """
    import torch
    from transformers import StaticCache

    from quantkit.runtime.cudagraph import decode_stepper

    step = step or model
    batch, plen = prompt_ids.shape
    device = prompt_ids.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if lean is not None:
        lean.reset(batch)
        forward = decode_stepper(lean)  # on a GPU: a CUDA graph per step, captured in the warm-up round
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            tok = forward(prompt_ids).argmax(-1, keepdim=True)
            sync()
            t1 = time.perf_counter()
            for _ in range(gen_len):
                tok = forward(tok).argmax(-1, keepdim=True)
            sync()
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1
    cache = StaticCache(config=model.config, max_cache_len=plen + gen_len + 1)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = model(prompt_ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                    cache_position=torch.arange(plen, device=device))
        tok = out.logits[:, -1:].argmax(-1)  # [batch, 1], greedy
        sync()
        t1 = time.perf_counter()
        for i in range(gen_len):
            out = step(tok, past_key_values=cache, use_cache=True,
                       cache_position=torch.tensor([plen + i], device=device))
            tok = out.logits[:, -1:].argmax(-1)
        sync()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def run_benches(models: dict, *, prompt_len: int = 128, gen_len: int = 64, batch: int = 1, repeat: int = 5,
                warmup: int = 1, bandwidth: float | None = None, compile: bool = False, seed: int = 0,
                lean: bool = True) -> dict[str, dict]:
    """Benchmark several models side by side: ``{name: model}`` -> ``{name: result}``.

    Repeats are interleaved (round ``r`` runs every model once, on the same prompt), so load
    from other processes on the machine hits every model alike and the ratios stay fair.
    ``lean``: run models the lean forward supports (:mod:`quantkit.runtime.lean`) with it, the
    others (and everything under ``compile``) with transformers' forward; each result says which.
    """
    import torch

    from quantkit.runtime.lean import lean_or_none

    g = torch.Generator().manual_seed(seed)
    steps = {n: (torch.compile(m.forward, dynamic=False) if compile else None) for n, m in models.items()}
    leans = {n: (lean_or_none(m, prompt_len + gen_len + 1, batch)[0] if lean and not compile else None)
             for n, m in models.items()}
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in models}
    bws = []
    for i in range(warmup + repeat):
        ids = torch.randint(0, min(m.config.vocab_size for m in models.values()), (batch, prompt_len), generator=g)
        for name, model in models.items():
            t = time_generation(model, ids.to(next(model.parameters()).device), gen_len, steps[name], leans[name])
            if i >= warmup:
                times[name].append(t)
        if bandwidth is None:
            bws.append(measure_bandwidth(device=next(iter(models.values())).get_input_embeddings().weight.device))
    bw = bandwidth if bandwidth is not None else max(bws)
    return {n: dict(_result(models[n], times[n], prompt_len, gen_len, batch, bw, compile),
                    forward=_forward_name(leans[n])) for n in models}


def _forward_name(lean) -> str:
    """How decode ran: ``transformers``, ``lean`` (its torch ops) or ``lean-native`` (one C call per token)."""
    if lean is None:
        return "transformers"
    return "lean-native" if lean.native_step else "lean-cudagraph" if lean.graphed is not None else "lean"


def run_bench(model, **kwargs) -> dict:
    """Benchmark one model (float or packed, on its device); returns the ``--json`` fields.
    Keywords as :func:`run_benches`."""
    return run_benches({"model": model}, **kwargs)["model"]


def _result(model, times, prompt_len, gen_len, batch, bw, compile) -> dict:
    import torch

    from quantkit.runtime.backends import backend_setting, resolve_backend

    device = next(model.parameters()).device
    prefill_s, decode_s = [t[0] for t in times], [t[1] for t in times]
    per_token = decode_bytes_per_token(model)
    pp, pp_std = _mean_std([batch * prompt_len / s for s in prefill_s])
    tg, tg_std = _mean_std([batch * gen_len / s for s in decode_s])
    ttft, ttft_std = _mean_std(prefill_s)
    roofline = batch * bw / per_token  # one pass over the weights yields `batch` tokens
    n_quant = sum(1 for m in model.modules() if hasattr(m, "qweight") and hasattr(m, "_backend"))
    return {
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(device),
        "backend": backend_setting() if not n_quant else f"{backend_setting()}:{resolve_backend(device)}",
        "threads": torch.get_num_threads(),
        "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len, "repeat": len(times), "compile": compile,
        "quantized_linears": n_quant,
        "prefill_tokens_per_s": pp, "prefill_tokens_per_s_std": pp_std,
        "decode_tokens_per_s": tg, "decode_tokens_per_s_std": tg_std,
        "ttft_s": ttft, "ttft_s_std": ttft_std,
        "peak_memory_bytes": peak_memory_bytes(device),
        "weight_bytes": weight_bytes(model),
        "decode_bytes_per_token": per_token,
        "bandwidth_bytes_per_s": bw,
        "roofline_tokens_per_s": roofline,
        "roofline_fraction": tg / roofline,
    }


# ---- presentation ---------------------------------------------------------------------------
def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def bench_table(results: list[tuple[str, dict]]):
    """A llama-bench style table: a ``pp`` (prefill) and a ``tg`` (decode) row per (name, result);
    the caption has time to first token, peak memory and the roofline's terms."""
    from rich.table import Table

    t = Table("model", "size", "dtype", "backend", "test", "t/s", "roofline")
    notes = []
    for name, r in results:
        common = [name, _size(r["weight_bytes"]), r["dtype"], r["backend"]]
        x = f" x{r['batch']}" if r["batch"] > 1 else ""
        t.add_row(*common, f"pp{r['prompt_len']}{x}", f"{r['prefill_tokens_per_s']:.1f} ± {r['prefill_tokens_per_s_std']:.1f}", "")
        t.add_row(*common, f"tg{r['gen_len']}{x}", f"{r['decode_tokens_per_s']:.1f} ± {r['decode_tokens_per_s_std']:.1f}",
                  f"{100 * r['roofline_fraction']:.0f}%")
        notes.append(f"{name}: TTFT {1e3 * r['ttft_s']:.1f} ± {1e3 * r['ttft_s_std']:.1f} ms, peak memory "
                     f"{_size(r['peak_memory_bytes'])}, decode reads {_size(r['decode_bytes_per_token'])}/token "
                     f"at {r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s = {r['roofline_tokens_per_s']:.0f} t/s roofline")
    t.caption = "\n".join(notes + [f"{results[0][1]['threads']} threads" if results else ""])
    return t
