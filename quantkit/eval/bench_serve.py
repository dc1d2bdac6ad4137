"""Benchmark `quantkit serve`: one streaming client vs N concurrent ones, and a load test under hostile input.

Starts the server as a subprocess on 127.0.0.1 (a free port), then, over HTTP with streaming:

1. single client: ``--single-requests`` streamed completions one after another;
2. N clients (``--clients``, default 16) streaming at once;
   each request asks for exactly ``--max-tokens`` tokens (``ignore_eos``), greedy;
3. optionally (``--load N``) the issue #15 acceptance load: N requests, ``--load-concurrency`` (16) in
   flight, one in five malformed, half the valid ones streamed, and in the middle one poisoned request
   (``temperature: 1e-300``) and one 15 MB prompt; meanwhile a prober GETs /health every 100 ms, and
   the server's RSS (/proc/PID/status VmRSS) is read before and after. It passes when no valid request
   is lost, the poisoned one is served, the 15 MB prompt is refused with 400, /health always answers
   within 1 s, and RSS grows by at most 10%. ``--load-only`` skips 1 and 2.

Then (unless ``--load-only`` or ``--no-generate``), with the server stopped, the same single-client
requests through ``quantkit.runtime.generate.generate`` in this process (the same threads, no HTTP):
what ``quantkit generate`` decodes per sequence.

Prints a summary (a ``load verdict:`` line for 3) and one JSON line. The targets (issue 21): aggregate
tok/s with N clients >= 3x a single client's, and the single served client >= 0.8x ``generate``'s
tok/s on the same prompts, with the same text.

    python -m quantkit.eval.bench_serve                          # stories260K fixture (from the repository root)
    python -m quantkit.eval.bench_serve --model /path/SmolLM2-135M-Instruct.Q4_1.gguf --max-tokens 48 --threads 2
    python -m quantkit.eval.bench_serve --model CKPT --threads 1 --load 200 --load-only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]  # the repository (the default model is its test fixture)
TARGET_RATIO = 3.0
TARGET_VS_GENERATE = 0.8  # a lone served stream against `generate` on the same prompts
BIG_PROMPT_CHARS = 15_000_000  # just under the server's 16 MB body limit (audit E30)
HEALTH_PERIOD_S, HEALTH_MAX_S, RSS_MAX_GROWTH = 0.1, 1.0, 0.10  # the acceptance bounds
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park.", "A big red ball",
           "One day, a cat", "The sun was hot and", "Tim had a toy car.", "Mom said", "Ben and Mia",
           "It was a rainy day.", "The little bird", "Sue liked to", "There was a big tree", "The boy ran",
           "In the forest", "A small girl"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m quantkit.cli serve` in a subprocess; stderr is drained into `log`."""

    def __init__(self, model: str, name: str, max_batch: int, threads: int | None):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.name = name
        cmd = [sys.executable, "-m", "quantkit.cli", "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
               "--model-name", name, "--max-batch", str(max_batch), "--max-queue", "256", "--log-level", "warning"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit("server exited:\n" + "".join(self.log))
            if time.monotonic() > deadline:
                raise SystemExit("server did not come up:\n" + "".join(self.log))
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)

    def stats(self) -> dict:
        return httpx.get(f"{self.base}/metrics", params={"format": "json"}, timeout=10).json()

    def rss_mb(self) -> float:
        """The server process's resident memory (VmRSS), MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS in /proc/{self.proc.pid}/status")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


async def stream_completion(http: httpx.AsyncClient, name: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion; its text, token count (from usage) and timing."""
    body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    text, tokens, finish = [], 0, None
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if first is None and choice["text"]:
                    first = time.perf_counter() - t0
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
    return {"text": "".join(text), "tokens": tokens, "finish": finish, "seconds": time.perf_counter() - t0,
            "ttft": first}


async def single_client(server: Server, n_requests: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=server.base, timeout=600) as http:
        t0 = time.perf_counter()
        runs = [await stream_completion(http, server.name, PROMPTS[i % len(PROMPTS)], max_tokens)
                for i in range(n_requests)]
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in runs)
    return {"requests": n_requests, "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
            "texts": [r["text"] for r in runs]}


async def concurrent_clients(server: Server, n_clients: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=n_clients + 4)
    async with httpx.AsyncClient(base_url=server.base, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(stream_completion(http, server.name, PROMPTS[i % len(PROMPTS)], max_tokens)
                                      for i in range(n_clients)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in runs)
    ok = all(r["tokens"] == max_tokens and r["finish"] == "length" for r in runs)
    return {"clients": n_clients, "tokens": tokens, "seconds": wall, "tok_s": tokens / wall, "all_complete": ok,
            "median_ttft_s": sorted(r["ttft"] or 0 for r in runs)[n_clients // 2],
            "texts": [r["text"] for r in runs]}


async def complete(http: httpx.AsyncClient, body: dict) -> tuple[int, dict]:
    """One non-streamed completion: (HTTP status, JSON body)."""
    r = await http.post("/v1/completions", json=body)
    return r.status_code, r.json()


class HealthProber:
    """GET /health every HEALTH_PERIOD_S from its own thread and connection (client-side work on the
    load's event loop does not inflate it); `stop()` returns probes, failures and the worst latency."""

    def __init__(self, base: str):
        self._stop = threading.Event()
        self.latencies: list[float] = []
        self.failures = 0
        self._thread = threading.Thread(target=self._run, args=(base,), daemon=True)
        self._thread.start()

    def _run(self, base: str) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = http.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - t0)
                self.failures += not ok
                self._stop.wait(HEALTH_PERIOD_S)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(120)
        return {"probes": len(self.latencies), "failed": self.failures, "max_s": max(self.latencies, default=0.0)}


async def _hostile(http: httpx.AsyncClient, name: str, kind: str) -> dict:
    """The two requests sent in the middle of the load: a poisoned temperature, a 15 MB prompt."""
    t0 = time.perf_counter()
    try:
        if kind == "poisoned":  # valid per the schema: must be served (greedy), and must not hurt the batch
            status, body = await complete(http, {"model": name, "prompt": "Once upon a time", "max_tokens": 24,
                                                  "temperature": 1e-300, "ignore_eos": True})
            ok = status == 200 and body["usage"]["completion_tokens"] == 24
        else:  # refused with 400 context_length_exceeded, without freezing the server
            status, body = await complete(http, {"model": name, "prompt": "a" * BIG_PROMPT_CHARS, "max_tokens": 4})
            ok = status == 400 and body["error"]["code"] == "context_length_exceeded"
    except Exception as e:  # noqa: BLE001 - reported in the verdict, not raised
        status, ok = f"{type(e).__name__}", False
    return {"status": status, "ok": ok, "seconds": round(time.perf_counter() - t0, 3)}


async def load_test(server: Server, n_requests: int, concurrency: int = 16, budget_s: float = 600) -> dict:
    """n_requests (1 in 5 malformed; half the valid ones streamed) plus, in the middle, one poisoned and
    one 15 MB request; at most ``concurrency`` in flight, the whole run bounded by budget_s."""
    rng = random.Random(0)
    bad = [b'{"model": ', json.dumps({"model": "nope", "prompt": "hi"}).encode(),
           json.dumps({"model": server.name, "prompt": "hi", "max_tokens": 0}).encode(),
           b'{"model": "x", "prompt": "\xc3\x28"}', b"[" * 100_000 + b"]" * 100_000]
    sem = asyncio.Semaphore(concurrency)
    counts = {"valid": 0, "ok": 0, "lost": 0, "malformed": 0, "rejected_4xx": 0}
    hostile = {}

    async def one(http, i):
        async with sem:
            if isinstance(i, str):
                hostile[i] = await _hostile(http, server.name, i)
            elif i % 5 == 4:
                r = await http.post("/v1/completions", content=rng.choice(bad),
                                    headers={"content-type": "application/json"})
                counts["malformed"] += 1
                counts["rejected_4xx"] += 400 <= r.status_code < 500
            else:
                counts["valid"] += 1
                counts["ok" if await _valid(http, server.name, rng, i % 2 == 0) else "lost"] += 1

    jobs: list[int | str] = list(range(n_requests))
    jobs[n_requests // 2 : n_requests // 2] = ["poisoned", "big_prompt"]  # the semaphore admits in order
    async with httpx.AsyncClient(base_url=server.base, timeout=300,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in jobs)), budget_s)
        wall = time.perf_counter() - t0
    return {**counts, **hostile, "requests": len(jobs), "seconds": round(wall, 1)}


async def _valid(http: httpx.AsyncClient, name: str, rng: random.Random, stream: bool) -> bool:
    """One valid greedy request of 1..48 tokens; True when it came back complete."""
    n, prompt = rng.randint(1, 48), rng.choice(PROMPTS)
    try:
        if stream:
            res = await stream_completion(http, name, prompt, n)
            return res["tokens"] == n and res["finish"] == "length"
        status, body = await complete(http, {"model": name, "prompt": prompt, "max_tokens": n, "temperature": 0,
                                             "ignore_eos": True})
        return status == 200 and body["usage"]["completion_tokens"] == n
    except Exception:  # noqa: BLE001 - counted, not raised: the load test reports losses
        return False


def run_load(server: Server, n_requests: int, concurrency: int) -> dict:
    """The acceptance load (see the module doc) with /health probed and RSS read around it; its verdict."""
    rss_before = server.rss_mb()
    prober = HealthProber(server.base)
    try:
        load = asyncio.run(load_test(server, n_requests, concurrency))
    finally:
        health = prober.stop()
    time.sleep(1.0)  # let the last requests' memory go
    rss_after = server.rss_mb()
    load.update(health=health, rss_before_mb=round(rss_before, 1), rss_after_mb=round(rss_after, 1))
    load["pass"] = (load["lost"] == 0 and load["rejected_4xx"] == load["malformed"] and load["poisoned"]["ok"]
                    and load["big_prompt"]["ok"] and health["failed"] == 0 and health["max_s"] < HEALTH_MAX_S
                    and rss_after <= rss_before * (1 + RSS_MAX_GROWTH))
    print(f"load verdict: {'PASS' if load['pass'] else 'FAIL'} | {load['requests']} requests, {concurrency} in flight, "
          f"{load['seconds']} s | valid {load['valid']}, lost {load['lost']} | malformed {load['malformed']}, "
          f"refused 4xx {load['rejected_4xx']} | poisoned (temperature 1e-300): HTTP {load['poisoned']['status']} | "
          f"15 MB prompt: HTTP {load['big_prompt']['status']} in {load['big_prompt']['seconds']} s | /health max "
          f"{health['max_s']:.3f} s over {health['probes']} probes, {health['failed']} failed | server RSS "
          f"{rss_before:.1f} -> {rss_after:.1f} MB ({100 * (rss_after / rss_before - 1):+.1f}%)", file=sys.stderr)
    return load


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "stories260K"))
    ap.add_argument("--name", default=None, help="Served model name (default: the path's base name).")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--single-requests", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="Server torch threads.")
    ap.add_argument("--load", type=int, default=0, help="Also run the acceptance load test of this many requests.")
    ap.add_argument("--load-concurrency", type=int, default=16, help="Requests in flight during the load test.")
    ap.add_argument("--load-only", action="store_true", help="Skip the single/concurrent throughput phases.")
    ap.add_argument("--no-generate", action="store_true", help="Skip the comparison with `generate` in this process.")
    return ap.parse_args()


def throughput(server: Server, args: argparse.Namespace) -> dict:
    """Phases 1 and 2: one client, then ``--clients`` at once; their ratio against the target."""
    single = asyncio.run(single_client(server, args.single_requests, args.max_tokens))
    multi = asyncio.run(concurrent_clients(server, args.clients, args.max_tokens))
    # greedy under batching equals greedy alone: the prompts both phases share
    same = all(multi["texts"][i] == single["texts"][i] for i in range(min(args.single_requests, args.clients)))
    ratio = multi["tok_s"] / single["tok_s"]
    print(f"{server.name}: 1 client {single['tok_s']:.1f} tok/s | {args.clients} clients {multi['tok_s']:.1f} tok/s "
          f"| ratio {ratio:.2f}x (target {TARGET_RATIO}x) | all complete {multi['all_complete']} "
          f"| batch == single {same}", file=sys.stderr)
    return {"single_tok_s": round(single["tok_s"], 1), "concurrent_clients": args.clients,
            "concurrent_tok_s": round(multi["tok_s"], 1), "ratio": round(ratio, 2),
            "all_complete": multi["all_complete"], "batch_equals_single": same,
            "median_ttft_s": round(multi["median_ttft_s"], 3), "target_ratio": TARGET_RATIO,
            "pass": ratio >= TARGET_RATIO and multi["all_complete"] and same, "single_texts": single["texts"]}


def generate_rate(args: argparse.Namespace) -> dict:
    """The single client's requests through `generate` in this process (after the server stopped)."""
    import torch

    from quantkit.checkpoint.formats import load_model
    from quantkit.runtime.generate import SamplingParams, encode_prompt, generate

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    generate(model, tok, encode_prompt(tok, PROMPTS[0]), SamplingParams(max_new_tokens=8))  # warm-up, as the server's
    params = SamplingParams(max_new_tokens=args.max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    runs = [generate(model, tok, encode_prompt(tok, PROMPTS[i % len(PROMPTS)]), params)
            for i in range(args.single_requests)]
    wall = time.perf_counter() - t0
    return {"tok_s": sum(g.completion_tokens for g in runs) / wall, "texts": [g.text for g in runs]}


def versus_generate(result: dict, gen: dict) -> dict:
    """The served single client against `generate`: tok/s ratio and the same greedy text."""
    ratio = result["single_tok_s"] / gen["tok_s"]
    same = gen["texts"] == result.pop("single_texts")
    print(f"generate: {gen['tok_s']:.1f} tok/s | served 1 client / generate {ratio:.2f}x (target "
          f">= {TARGET_VS_GENERATE}x) | same text {same}", file=sys.stderr)
    return {"generate_tok_s": round(gen["tok_s"], 1), "served_vs_generate": round(ratio, 3),
            "served_equals_generate": same, "target_vs_generate": TARGET_VS_GENERATE,
            "pass_vs_generate": ratio >= TARGET_VS_GENERATE and same}


def main() -> None:
    args = _args()
    name = args.name or os.path.basename(os.path.normpath(args.model))
    server = Server(args.model, name, args.max_batch, args.threads)
    try:
        t0 = time.perf_counter()
        server.wait_ready()
        result = {"model": name, "threads": args.threads, "max_tokens": args.max_tokens,
                  "startup_s": round(time.perf_counter() - t0, 1)}
        asyncio.run(single_client(server, 1, 8))  # warm-up
        checks = []
        if not args.load_only:
            result.update(throughput(server, args))
            checks.append(result["pass"])
        if args.load:
            asyncio.run(concurrent_clients(server, args.load_concurrency, 16))  # the batch path warm: RSS settles
            result["load"] = run_load(server, args.load, args.load_concurrency)
            checks.append(result["load"]["pass"])
        time.sleep(0.2)
        stats = server.stats()
    finally:
        server.stop()
    result.update(after={k: stats[k] for k in ("running", "queued", "cancelled", "errors")},
                  loadavg_1m=round(os.getloadavg()[0], 2))
    if "single_texts" in result and not args.no_generate:
        result.update(versus_generate(result, generate_rate(args)))
        checks.append(result["pass_vs_generate"])
    result.pop("single_texts", None)
    result["pass"] = all(checks) and stats["running"] == 0 and stats["queued"] == 0
    print(json.dumps(result))
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
