"""The OpenAI parameters that shape the answer (issue 21): ``logprobs``/``top_logprobs`` checked
against the model's own log-softmax, ``n`` choices with per-choice seeds, and the chat template
applied as the tokenizer's ``apply_chat_template`` applies it."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from quantkit.runtime.generate import SamplingParams, encode_chat, encode_prompt, generate  # noqa: E402
from quantkit.serve.app import create_app  # noqa: E402
from quantkit.serve.engine import Engine  # noqa: E402

NAME = "stories260K"
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def client(model_tok):
    model, tok = model_tok
    with TestClient(create_app(Engine(model, tok, max_batch=4, max_queue=16), NAME)) as c:
        yield c


def _events(r) -> list:
    return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def _reference_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """log p(token | everything before) of each completion token, from one forward of the whole text."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.inference_mode():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = len(prompt_ids)
    return torch.stack([lp[n - 1 + i, t] for i, t in enumerate(completion_ids)])


def test_completion_logprobs_are_the_models(client, model_tok):
    model, tok = model_tok
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "Once upon", "max_tokens": 12,
                                             "temperature": 0, "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 12
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(12)]
    prompt = encode_prompt(tok, "Once upon")
    g = generate(model, tok, prompt, SamplingParams(max_new_tokens=12))  # the same greedy tokens (F7)
    assert g.text == choice["text"]
    ref = _reference_logprobs(model, prompt, g.token_ids)
    assert torch.allclose(torch.tensor(lp["token_logprobs"]), ref, atol=1e-4)
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and len(top) >= 3 and top[token] == value
        assert value == pytest.approx(max(top.values()))  # greedy: the most likely token
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6


def test_chat_logprobs_and_top_logprobs(client):
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    for c in content:
        assert c["bytes"] == list(c["token"].encode()) and len(c["top_logprobs"]) == 2
        assert c["top_logprobs"][0]["logprob"] >= c["top_logprobs"][1]["logprob"]
    plain = client.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 6, "temperature": 0})
    assert plain.json()["choices"][0]["logprobs"] is None
    assert plain.json()["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_n_choices_are_seeded_one_after_another(client):
    body = {"model": NAME, "prompt": "Once", "max_tokens": 10, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    r = client.post("/v1/completions", json={**body, "n": 3})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2] and r.json()["usage"]["completion_tokens"] == 30
    for i, c in enumerate(choices):  # choice i is the single request seeded with seed + i
        alone = client.post("/v1/completions", json={**body, "seed": 7 + i}).json()["choices"][0]["text"]
        assert c["text"] == alone
    assert len({c["text"] for c in choices}) > 1


def test_streamed_n_choices_with_logprobs_match_the_whole_answer(client):
    body = {"model": NAME, "prompt": "The dog", "max_tokens": 8, "temperature": 0.8, "seed": 3, "n": 2, "logprobs": 1,
            "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = _events(r)
    whole = client.post("/v1/completions", json={**body, "stream": False}).json()
    for i in range(2):
        parts = [c for e in events for c in e["choices"] if c["index"] == i]
        text = "".join(c["text"] for c in parts)
        tokens = [t for c in parts if c["logprobs"] for t in c["logprobs"]["tokens"]]
        assert text == whole["choices"][i]["text"] == "".join(tokens)
        assert parts[-1]["finish_reason"] == "length"
    assert events[-1]["usage"] == whole["usage"]


def test_chat_template_is_the_tokenizers(model_tok, client):
    """The server's chat prompt is the tokenizer's own `apply_chat_template` (here a ChatML template
    set on the fixture's tokenizer), counted in the usage."""
    _, tok = model_tok
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    old = tok.chat_template
    tok.chat_template = CHATML
    try:
        want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        want = list(want["input_ids"] if hasattr(want, "keys") else want)
        assert encode_chat(tok, messages) == want
        r = client.post("/v1/chat/completions", json={"model": NAME, "messages": messages, "max_tokens": 2})
        assert r.json()["usage"]["prompt_tokens"] == len(want)
    finally:
        tok.chat_template = old


def test_more_choices_than_the_server_holds_is_a_400(model_tok):
    model, tok = model_tok
    with TestClient(create_app(Engine(model, tok, max_batch=1, max_queue=0), NAME)) as c:
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "Once", "max_tokens": 2, "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_token_bytes_are_the_tokens_own(model_tok):
    """A byte-fallback piece reports its byte, not U+FFFD's UTF-8; GPT-2's byte-level alphabet maps back."""
    from quantkit.serve.logprobs import _byte_level_decoder, token_bytes

    _, tok = model_tok
    byte_id = tok.convert_tokens_to_ids("<0xE2>")
    assert token_bytes(tok, byte_id, "\ufffd") == (0xE2,)
    word = tok.convert_tokens_to_ids("\u2581ha")
    assert token_bytes(tok, word, " ha") == tuple(b" ha")
    d = _byte_level_decoder()
    assert len(d) == 256 and d["\u0120"] == 32 and d["\u0100"] == 0 and d["a"] == 97 and d["\u00ff"] == 255
