"""The HTTP app in-process (FastAPI TestClient): OpenAI shapes, SSE, bad input -> 4xx, queue full -> 503."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from click.testing import CliRunner  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from quantkit.runtime.generate import SamplingParams, encode_chat, encode_prompt, generate  # noqa: E402
from quantkit.serve.app import create_app  # noqa: E402
from quantkit.serve.engine import Engine  # noqa: E402

FIXTURE = str(Path(__file__).resolve().parents[1] / "fixtures" / "stories260K")
NAME = "stories260K"


@pytest.fixture(scope="module")
def client(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=4, max_queue=8)
    with TestClient(create_app(engine, NAME)) as c:
        c.engine = engine
        yield c


def _sse(lines) -> list:
    """Parsed `data:` payloads of an SSE body; the last is the string '[DONE]'."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return out


def test_health_models_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME
    text = client.get("/metrics").text
    for name in ("quantkit_tokens_per_second", "quantkit_requests_running", "quantkit_requests_queued"):
        assert f"\n{name} " in text
    assert client.get("/metrics?format=json").json()["max_batch"] == 4


def test_completion_equals_generate(client, model_tok):
    model, tok = model_tok
    ref = generate(model, tok, encode_prompt(tok, "Once upon"), SamplingParams(max_new_tokens=20))
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "Once upon", "max_tokens": 20,
                                             "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == ref.text and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 20, "total_tokens": 23}
    ids = encode_prompt(tok, "Once upon")  # a prompt as token ids gives the same answer
    r = client.post("/v1/completions", json={"model": NAME, "prompt": ids, "max_tokens": 20, "temperature": 0})
    assert r.json()["choices"][0]["text"] == ref.text


def test_chat_equals_generate_and_stream_matches(client, model_tok):
    model, tok = model_tok
    messages = [{"role": "user", "content": "Tell me a story"}]
    ref = generate(model, tok, encode_chat(tok, messages), SamplingParams(max_new_tokens=24))
    req = {"model": NAME, "messages": messages, "max_tokens": 24, "temperature": 0}
    body = client.post("/v1/chat/completions", json=req).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    with client.stream("POST", "/v1/chat/completions",
                       json={**req, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == ref.text
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24


def test_completion_stream_with_stop(client):
    req = {"model": NAME, "prompt": "", "max_tokens": 40, "temperature": 0, "stop": ["Lily"], "stream": True}
    with client.stream("POST", "/v1/completions", json=req) as r:
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in events[:-1])
    assert text == "Once upon a time, there was a little girl named "
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


LONG = "Once upon a time " * 200  # > 512 tokens


@pytest.mark.parametrize("body, status, code, param", [
    (b'{"model": "stories260K", "prompt": "hi"', 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    (b'{"model": "stories260K", "prompt": "\xff\xfe"}', 400, "invalid_utf8", None),
    (b'{"model": "stories260K", "prompt": "\\ud800"}', 400, "invalid_utf8", "prompt"),  # a lone surrogate
    # audit E21, E22: 500 internal errors (RecursionError; Python's 4300-digit limit on int())
    (b'{"model": "stories260K", "prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_json",
     None),
    (b'{"model": "stories260K", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400, "invalid_json", None),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found", "model"),
    ({"prompt": "hi"}, 400, "missing_required_parameter", "model"),
    ({"model": NAME}, 400, "missing_required_parameter", "prompt"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"model": NAME, "prompt": "hi", "max_tokens": -5}, 400, "invalid_value", "max_tokens"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 600}, 400, "context_length_exceeded", "max_tokens"),
    ({"model": NAME, "prompt": "hi", "max_tokens": "10"}, 400, "invalid_type", "max_tokens"),
    ({"model": NAME, "prompt": LONG}, 400, "context_length_exceeded", "prompt"),
    ({"model": NAME, "prompt": [1, 99999]}, 400, "invalid_value", "prompt"),
    ({"model": NAME, "prompt": 5}, 400, "invalid_value", "prompt"),
    ({"model": NAME, "prompt": "hi", "temperature": 3}, 400, "invalid_value", "temperature"),
    ({"model": NAME, "prompt": "hi", "top_p": 0}, 400, "invalid_value", "top_p"),
    ({"model": NAME, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
    ({"model": NAME, "prompt": "hi", "n": 17}, 400, "invalid_value", "n"),
    ({"model": NAME, "prompt": "hi", "logprobs": 21}, 400, "invalid_value", "logprobs"),
    ({"model": NAME, "prompt": "hi", "logprobs": "3"}, 400, "invalid_type", "logprobs"),
    ({"model": NAME, "prompt": "hi", "top_logprobs": 2}, 400, "invalid_value", "top_logprobs"),
    ({"model": NAME, "prompt": "hi", "stream": "yes"}, 400, "invalid_type", "stream"),
])
def test_bad_completion_requests(client, body, status, code, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post("/v1/completions", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["code"], err["param"]) == (code, param)


@pytest.mark.parametrize("body, param", [
    ({"model": NAME}, "messages"),
    ({"model": NAME, "messages": []}, "messages"),
    ({"model": NAME, "messages": [{"content": "hi"}]}, "messages[0]"),
    ({"model": NAME, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"model": NAME, "messages": [{"role": "user", "content": LONG}]}, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
])
def test_bad_chat_requests(client, body, param):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_unknown_route_and_method_are_openai_errors(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_server_keeps_serving_after_bad_input(client):
    for _ in range(3):
        client.post("/v1/completions", content=b"{{{")
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "Once upon", "max_tokens": 5,
                                             "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " a time, there was"
    stats = client.get("/metrics?format=json").json()
    assert stats["running"] == 0 and stats["queued"] == 0 and stats["rejected"]["400"] >= 3


def test_queue_full_is_503(model_tok):
    import threading

    model, tok = model_tok
    gate = threading.Event()

    def gated(*args, **kwargs):
        assert gate.wait(20)
        return model(*args, **kwargs)

    gated.config, gated.generation_config = model.config, model.generation_config
    engine = Engine(gated, tok, max_batch=1, max_queue=0)
    with TestClient(create_app(engine, NAME)) as c:
        held = engine.submit(encode_prompt(tok, "Once"), SamplingParams(max_new_tokens=3), lambda ev: None)
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "server_overloaded"
        held.cancel()
        gate.set()
        deadline = time.monotonic() + 20
        while engine.stats()["running"]:  # the cancelled request leaves at the engine's next step
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "Once upon", "max_tokens": 3,
                                            "temperature": 0})
        assert r.status_code == 200


def test_serve_without_fastapi_says_what_to_install(monkeypatch):
    import importlib.util

    from quantkit.cli import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    r = CliRunner().invoke(cli, ["serve", FIXTURE])
    assert r.exit_code == 1
    assert "pip install quantkit[serve]" in r.output and len(r.output.strip().splitlines()) == 1


def test_serve_cli_passes_the_kv_cache_to_the_engine(monkeypatch):
    """``serve --kv-bits 8``: the engine gets a quantized-cache factory (uvicorn is not started)."""
    pytest.importorskip("uvicorn")
    import uvicorn

    from quantkit.cli import cli
    from quantkit.runtime.kvcache import QuantizedKVCache
    from quantkit.serve import engine as engine_mod

    seen = {}
    real_init = engine_mod.Engine.__init__

    def spy(self, model, tok, **kw):
        seen["cache"] = kw.get("cache")
        seen["model"] = model
        real_init(self, model, tok, **kw)

    monkeypatch.setattr(engine_mod.Engine, "__init__", spy)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("ran", True))
    r = CliRunner().invoke(cli, ["serve", FIXTURE, "--kv-bits", "8"])
    assert r.exit_code == 0, r.output
    assert seen["ran"] and isinstance(seen["cache"](seen["model"]), QuantizedKVCache)
    r = CliRunner().invoke(cli, ["serve", FIXTURE])
    assert r.exit_code == 0 and seen["cache"] is None


@pytest.mark.parametrize("route,extra,param,code", [
    ("/v1/completions", {"logit_bias": {"7042": -100}}, "logit_bias", "invalid_value"),
    ("/v1/completions", {"presence_penalty": 2.0}, "presence_penalty", "invalid_value"),
    ("/v1/completions", {"frequency_penalty": 1.0}, "frequency_penalty", "invalid_value"),
    ("/v1/completions", {"suffix": "END"}, "suffix", "invalid_value"),
    ("/v1/completions", {"min_p": 0.1}, "min_p", "invalid_value"),
    ("/v1/completions", {"repetition_penalty": 1.3}, "repetition_penalty", "invalid_value"),
    ("/v1/completions", {"foo_unknown": 1}, "foo_unknown", "unknown_parameter"),
    ("/v1/completions", {"messages": []}, "messages", "unknown_parameter"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format", "invalid_value"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {"prompt": "hi"}, "prompt", "unknown_parameter"),
])
def test_parameters_that_would_change_the_text_are_refused_not_ignored(client, route, extra, param, code):
    """Ecosystem audit F11: a request relying on something the server does not do gets a 400 naming it."""
    body = {"model": NAME, "max_tokens": 2, **({"prompt": "hi"} if route == "/v1/completions" else
                                               {"messages": [{"role": "user", "content": "hi"}]}), **extra}
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)


def test_neutral_values_and_bookkeeping_keys_are_accepted(client):
    """What OpenAI clients send at their defaults changes nothing and is accepted."""
    body = {"model": NAME, "prompt": "hi", "max_tokens": 2, "n": 1, "best_of": 1, "echo": False, "logprobs": None,
            "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "suffix": None, "user": "u1",
            "stream": False, "seed": 3}
    assert client.post("/v1/completions", json=body).status_code == 200
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2,
            "response_format": {"type": "text"}, "tools": [], "parallel_tool_calls": True, "metadata": {"a": "b"}}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
