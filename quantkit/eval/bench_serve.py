"""Benchmark `quantkit serve`: one streaming client vs N concurrent ones, and a bounded load test.

Starts the server as a subprocess on 127.0.0.1 (a free port), then, over HTTP with streaming:

1. single client: ``--single-requests`` streamed completions one after another;
2. N clients (``--clients``, default 16) streaming at once;
   each request asks for exactly ``--max-tokens`` tokens (``ignore_eos``), greedy;
3. optionally (``--load N``) N requests, one in five malformed, at most 24 in flight, bounded in time.

Prints a summary and one JSON line. The target: aggregate tok/s with N clients >= 3x a single client's.

    python -m quantkit.eval.bench_serve                          # stories260K fixture (from the repository root)
    python -m quantkit.eval.bench_serve --model /path/SmolLM2-135M-Instruct.Q4_1.gguf --max-tokens 48 --threads 2
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


async def load_test(server: Server, n_requests: int, budget_s: float = 300) -> dict:
    """n_requests (1 in 5 malformed), at most 24 in flight, the whole run bounded by budget_s."""
    rng = random.Random(0)
    bad = [b'{"model": ', json.dumps({"model": "nope", "prompt": "hi"}).encode(),
           json.dumps({"model": server.name, "prompt": "hi", "max_tokens": 0}).encode(),
           b'{"model": "x", "prompt": "\xc3\x28"}']
    sem = asyncio.Semaphore(24)
    counts = {"ok": 0, "rejected_4xx": 0, "lost": 0}

    async def one(http, i):
        async with sem:
            if i % 5 == 4:
                r = await http.post("/v1/completions", content=rng.choice(bad),
                                    headers={"content-type": "application/json"})
                counts["rejected_4xx" if 400 <= r.status_code < 500 else "lost"] += 1
                return
            try:
                n = rng.randint(1, 24)
                res = await stream_completion(http, server.name, rng.choice(PROMPTS), n)
                counts["ok" if res["tokens"] == n else "lost"] += 1
            except Exception:  # noqa: BLE001 - counted, not raised: the load test reports losses
                counts["lost"] += 1

    async with httpx.AsyncClient(base_url=server.base, timeout=120) as http:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(n_requests))), budget_s)
        wall = time.perf_counter() - t0
    return {**counts, "requests": n_requests, "seconds": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "stories260K"))
    ap.add_argument("--name", default=None, help="Served model name (default: the path's base name).")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--single-requests", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="Server torch threads.")
    ap.add_argument("--load", type=int, default=0, help="Also run a load test of this many requests.")
    args = ap.parse_args()

    name = args.name or os.path.basename(os.path.normpath(args.model))
    server = Server(args.model, name, args.max_batch, args.threads)
    try:
        t0 = time.perf_counter()
        server.wait_ready()
        startup = time.perf_counter() - t0
        asyncio.run(single_client(server, 1, 8))  # warm-up
        single = asyncio.run(single_client(server, args.single_requests, args.max_tokens))
        multi = asyncio.run(concurrent_clients(server, args.clients, args.max_tokens))
        # greedy under batching equals greedy alone: the prompts both phases share
        same = [multi["texts"][i] == single["texts"][i] for i in range(min(args.single_requests, args.clients))]
        load = asyncio.run(load_test(server, args.load)) if args.load else None
        time.sleep(0.2)
        stats = server.stats()
    finally:
        server.stop()

    ratio = multi["tok_s"] / single["tok_s"]
    result = {"model": name, "threads": args.threads, "max_tokens": args.max_tokens, "startup_s": round(startup, 1),
              "single_tok_s": round(single["tok_s"], 1), "concurrent_clients": args.clients,
              "concurrent_tok_s": round(multi["tok_s"], 1), "ratio": round(ratio, 2),
              "all_complete": multi["all_complete"], "batch_equals_single": all(same),
              "median_ttft_s": round(multi["median_ttft_s"], 3), "load": load,
              "after": {k: stats[k] for k in ("running", "queued", "cancelled", "errors")},
              "loadavg_1m": round(os.getloadavg()[0], 2), "target_ratio": TARGET_RATIO,
              "pass": ratio >= TARGET_RATIO and multi["all_complete"] and all(same)
              and stats["running"] == 0 and stats["queued"] == 0 and (load is None or load["lost"] == 0)}
    print(f"{name}: 1 client {single['tok_s']:.1f} tok/s | {args.clients} clients {multi['tok_s']:.1f} tok/s "
          f"| ratio {ratio:.2f}x (target {TARGET_RATIO}x) | all complete {multi['all_complete']} "
          f"| batch == single {all(same)}" + (f" | load {load}" if load else ""), file=sys.stderr)
    print(json.dumps(result))
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
