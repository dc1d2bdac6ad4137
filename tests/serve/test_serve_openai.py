"""`quantkit serve` as a real subprocess on 127.0.0.1, driven by the official openai client and httpx.

The server runs a packed checkpoint (stories260K quantized with RTN int8, quantized linears swapped
in), and the reference is the runtime's own `generate` on the same checkpoint. Covers: completions, chat and streaming equal to the runtime's own greedy `generate`; 16 concurrent
streaming clients; a client that disconnects mid-stream frees its slot; a bounded load test (200
requests, some malformed; 127.0.0.1 only) loses no valid request and leaves no stuck slot.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from quantkit.runtime.generate import SamplingParams, TextStream, encode_chat, encode_prompt, generate  # noqa: E402

FIXTURE = str(Path(__file__).resolve().parents[1] / "fixtures" / "stories260K")
NAME = "stories260K"
PROMPTS = ["", "Once upon", "The dog", "Lily and Tom went to the park. They", "A big red", "Sam", "One day",
           "The sun was hot and the", "Tim had a toy car.", "The cat", "Mom said", "Ben and Mia",
           "It was a rainy day.", "The little bird", "Sue liked to", "There was a big tree"]


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory) -> str:
    from quantkit import api
    from quantkit.checkpoint.formats import load_model

    model, tok = load_model(FIXTURE)
    result = api.compress(model, "rtn", {"bits": 8, "group_size": -1})
    return str(api.save(model, tok, tmp_path_factory.mktemp("serve") / "stories260K-rtn8", "rtn", result))


@pytest.fixture(scope="module")
def model_tok(packed_dir):
    from quantkit.checkpoint.formats import load_model

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load_model(packed_dir)
    assert any(type(m).__name__ == "QuantLinear" for m in model.modules())  # really the packed runtime
    yield model, tok
    torch.set_num_threads(old)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(request, packed_dir):
    port = _free_port()
    cmd = [sys.executable, "-m", "quantkit.cli", "serve", packed_dir, "--model-name", NAME, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", "16", "--max-queue", "64", "--threads", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    drain = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)  # the pipe never fills
    drain.start()
    base = f"http://127.0.0.1:{port}"
    request.getfixturevalue("model_tok")  # load the reference model while the server starts
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, f"server exited: {''.join(log)}"
        assert time.monotonic() < deadline, f"server did not come up: {''.join(log)}"
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    yield base
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    assert not any("Traceback" in line for line in log), "".join(log)


def _client(base: str, cls=None):
    return (cls or openai.OpenAI)(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def _stats(base: str) -> dict:
    return httpx.get(f"{base}/metrics", params={"format": "json"}, timeout=5).json()


def _wait_idle(base: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(base)
        if stats["running"] == 0 and stats["queued"] == 0:
            return stats
        assert time.monotonic() < deadline, f"slots still busy: {stats}"
        time.sleep(0.05)


def test_openai_client_completions_chat_and_streaming(server, model_tok):
    model, tok = model_tok
    client = _client(server)
    assert [m.id for m in client.models.list().data] == [NAME]

    ref = generate(model, tok, encode_prompt(tok, "Once upon"), SamplingParams(max_new_tokens=24))
    out = client.completions.create(model=NAME, prompt="Once upon", max_tokens=24, temperature=0)
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 24
    pieces = [c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="Once upon", max_tokens=24, temperature=0, stream=True)]
    assert "".join(pieces) == ref.text and len(pieces) > 1

    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A story, please"}]
    ref = generate(model, tok, encode_chat(tok, messages), SamplingParams(max_new_tokens=32))
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=32, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == ref.text
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=32, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == 32

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="hi", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def test_16_concurrent_streaming_clients(server, model_tok):
    model, tok = model_tok
    n_tokens = 32
    refs = [generate(model, tok, encode_prompt(tok, p), SamplingParams(max_new_tokens=n_tokens)).text
            for p in PROMPTS]

    async def one(client, prompt):
        stream = await client.completions.create(model=NAME, prompt=prompt, max_tokens=n_tokens, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def run(prompts):
        client = _client(server, openai.AsyncOpenAI)
        t0 = time.perf_counter()
        texts = await asyncio.gather(*(one(client, p) for p in prompts))
        return texts, time.perf_counter() - t0

    asyncio.run(run(PROMPTS[:1]))  # warm up
    texts, seconds_16 = asyncio.run(run(PROMPTS))
    assert texts == refs  # continuous batching gives each client exactly its greedy single-sequence output
    _, seconds_1 = asyncio.run(run(PROMPTS[1:2]))
    # informational only (speed targets live in eval/bench_serve.py)
    print(f"\n1 client: {n_tokens / seconds_1:.0f} tok/s; 16 clients: {16 * n_tokens / seconds_16:.0f} tok/s")
    _wait_idle(server)


def test_client_disconnect_mid_stream_frees_its_slot(server):
    before = _stats(server)["cancelled"]
    body = {"model": NAME, "prompt": "Once", "max_tokens": 450, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert got[0].startswith("data: ")
    # the connection is closed here, long before 450 tokens
    stats = _wait_idle(server)
    assert stats["cancelled"] == before + 1


def test_client_that_gives_up_on_a_non_streaming_request_frees_its_slot(server):
    before = _stats(server)["cancelled"]
    body = {"model": NAME, "prompt": "Once", "max_tokens": 450, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    stats = _wait_idle(server)
    assert stats["cancelled"] == before + 1


def test_bounded_load_with_malformed_requests(server, model_tok):
    """200 requests (about 1 in 5 malformed), at most 24 in flight, 60 s budget; no valid request lost."""
    model, tok = model_tok
    prompts = PROMPTS[:6]
    refs = {p: generate(model, tok, encode_prompt(tok, p), SamplingParams(max_new_tokens=16)) for p in prompts}

    def expected(prompt: str, n: int) -> tuple[str, str]:
        """Greedy text and finish reason for max_tokens=n, from the 16-token reference."""
        ref = refs[prompt]
        if n > len(ref.token_ids):  # the reference met EOS first
            return ref.text, ref.finish_reason
        stream = TextStream(tok, encode_prompt(tok, prompt))
        return "".join(stream.push(t) for t in ref.token_ids[:n]) + stream.flush(), "length"

    rng = random.Random(0)
    bad = [
        (b'{"model": "stories260K", "prompt": ', 400),
        (json.dumps({"model": "nope", "prompt": "hi"}).encode(), 404),
        (json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 0}).encode(), 400),
        (b'{"model": "stories260K", "prompt": "\xc3\x28"}', 400),
        (json.dumps({"model": NAME, "prompt": "Once upon a time " * 200}).encode(), 400),
    ]
    jobs = []
    for i in range(200):
        if i % 5 == 4:
            jobs.append(("bad",) + bad[rng.randrange(len(bad))])
        else:
            jobs.append(("ok", rng.choice(prompts), rng.randint(1, 16), rng.random() < 0.5))

    async def run_job(http, sem, job):
        async with sem:
            if job[0] == "bad":
                r = await http.post("/v1/completions", content=job[1],
                                    headers={"content-type": "application/json"})
                return job, r.status_code, r.json()
            _, prompt, n, stream = job
            body = {"model": NAME, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream}
            if not stream:
                r = await http.post("/v1/completions", json=body)
                data = r.json()
                return job, r.status_code, (data["choices"][0]["text"], data["choices"][0]["finish_reason"])
            text, finish = [], None
            async with http.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        choice = json.loads(line[6:])["choices"][0]
                        text.append(choice["text"])
                        finish = choice["finish_reason"] or finish
            return job, r.status_code, ("".join(text), finish)

    async def main():
        sem = asyncio.Semaphore(24)
        async with httpx.AsyncClient(base_url=server, timeout=30) as http:
            return await asyncio.wait_for(asyncio.gather(*(run_job(http, sem, j) for j in jobs)), 60)

    results = asyncio.run(main())
    n_ok = n_bad = 0
    for job, status, payload in results:
        if job[0] == "bad":
            assert status == job[2] and set(payload["error"]) == {"message", "type", "param", "code"}
            n_bad += 1
            continue
        _, prompt, n, _ = job
        assert status == 200, payload
        assert payload == expected(prompt, n)
        n_ok += 1
    assert n_ok == 160 and n_bad == 40
    stats = _wait_idle(server)
    assert stats["running"] == 0 and stats["queued"] == 0
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200
