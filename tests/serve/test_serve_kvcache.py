"""Continuous batching over a quantized KV cache (``serve --kv-bits``): kvbatch moves the rows of a
`QuantizedKVCache`, and a request's greedy text does not depend on what else is in the batch.

Issue #15: with ``--kv-bits 8`` every request failed as soon as two shared a batch ("Sizes of tensors
must match", kvbatch knew only the float ``keys``/``values`` of transformers' layers)."""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from quantkit.runtime.generate import SamplingParams, encode_prompt
from quantkit.runtime.kvcache import KVQuantConfig, QuantizedKVCache
from quantkit.serve import kvbatch
from quantkit.serve.engine import Engine

FIXTURE = str(Path(__file__).resolve().parents[1] / "fixtures" / "stories260K")
CONFIGS = [KVQuantConfig(8), KVQuantConfig(4), KVQuantConfig(4, keys="channel", group=8), KVQuantConfig(4, rotate=True)]
PROMPTS = ["Once upon", "There was a big tree", "Lily and Tom went to the park. They", "The dog", "Sam",
           "It was a rainy day. Mom said"]


@pytest.fixture(scope="module")
def int4_model():
    """stories260K with rtn int4 weights: every matmul computes each row on its own (see the engine's
    docstring), so a row's numbers in a batch are bitwise its numbers alone."""
    from quantkit import api
    from quantkit.checkpoint.formats import load_model

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load_model(FIXTURE)
    api.compress(model, "rtn", {"bits": 4, "group_size": -1}, pack=True)
    yield model, tok
    torch.set_num_threads(old)


def _states(seed: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(rows, 2, length, 8, generator=g), torch.randn(rows, 2, length, 8, generator=g)
    k[..., 3] *= 8  # an outlier channel, as keys have
    return k, v


def _cache(cfg: KVQuantConfig, length: int, seed: int) -> QuantizedKVCache:
    cache = QuantizedKVCache(cfg, num_layers=2)
    for layer in range(2):
        cache.update(*_states(seed + layer, 1, length), layer)
    return cache


def _step(batch: QuantizedKVCache, alone: list[QuantizedKVCache], seed: int) -> None:
    """One token per row through every layer: each row reads what its own cache reads."""
    t = kvbatch.seq_length(batch) + 1
    for layer in range(2):
        new = [_states(seed + 10 * layer + i, 1, 1) for i in range(len(alone))]
        keys, values = batch.update(torch.cat([k for k, _ in new]), torch.cat([v for _, v in new]), layer)
        for i, (own, (k, v)) in enumerate(zip(alone, new)):
            k_own, v_own = own.update(k, v, layer)
            n = k_own.shape[2]
            assert torch.equal(keys[i:i + 1, :, t - n:], k_own) and torch.equal(values[i:i + 1, :, t - n:], v_own)
    assert kvbatch.seq_length(batch) == t


@pytest.mark.parametrize("cfg", CONFIGS)
def test_kvbatch_rows_of_a_quantized_cache_read_as_alone(cfg):
    lengths = [3, 13, 6]
    alone = [_cache(cfg, n, 10 * i) for i, n in enumerate(lengths)]
    batch = _cache(cfg, lengths[0], 0)
    kvbatch.concat_rows(batch, _cache(cfg, lengths[1], 10))  # the batch is shorter: it is padded
    assert kvbatch.seq_length(batch) == 13
    _step(batch, alone[:2], seed=100)
    kvbatch.concat_rows(batch, _cache(cfg, lengths[2], 20))
    for s in range(4):
        _step(batch, alone, seed=200 + 100 * s)
    kvbatch.select_rows(batch, torch.tensor([2, 0]))  # the longest leaves
    alone = [alone[2], alone[0]]
    kvbatch.drop_left(batch, kvbatch.seq_length(batch) - max(c.get_seq_length() for c in alone))
    assert kvbatch.seq_length(batch) == 10
    for s in range(9):  # key groups of 8 fill in both rows
        _step(batch, alone, seed=700 + 100 * s)


def _texts_alone_and_batched(engine: Engine, ids: list[list[int]], params: list[SamplingParams]):
    alone = [engine.generate(i, p)[0] for i, p in zip(ids, params)]
    inboxes = [queue.Queue() for _ in ids]
    for i, p, q in zip(ids, params, inboxes):  # all at once: max_batch of them run, the rest join as rows leave
        engine.submit(i, p, q.put)
    batched = []
    for q in inboxes:
        events = [q.get(timeout=60)]
        while events[-1].kind == "delta":
            events.append(q.get(timeout=60))
        assert events[-1].kind == "done", events[-1].message
        batched.append("".join(e.text for e in events))
    return alone, batched


@pytest.mark.parametrize("cfg", CONFIGS, ids=["int8", "int4", "int4-channel", "int4-rotated"])
def test_engine_batches_a_quantized_kv_cache_as_alone(int4_model, cfg, monkeypatch):
    """Six requests, three slots: rows of every length join mid-decode and leave at different steps;
    each greedy text equals the request's text served alone with the same KV cache."""
    model, tok = int4_model
    joins = []
    real_concat = kvbatch.concat_rows
    monkeypatch.setattr(kvbatch, "concat_rows", lambda c, o: joins.append(1) or real_concat(c, o))
    ids = [encode_prompt(tok, p) for p in PROMPTS]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (30, 12, 41, 20, 35, 17)]
    engine = Engine(model, tok, max_batch=3, max_queue=8, cache=lambda m: QuantizedKVCache.for_model(m, cfg)).start()
    try:
        alone, batched = _texts_alone_and_batched(engine, ids, params)
        assert batched == alone and len(joins) >= 3
        assert engine.stats()["errors"] == 0
    finally:
        engine.stop()


def test_app_serves_concurrent_requests_with_kv_bits(int4_model):
    """What ``quantkit serve CKPT --kv-bits 8`` runs: the CLI's cache factory behind the HTTP app."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from quantkit.cli.serve import kv_cache_factory
    from quantkit.serve.app import create_app

    model, tok = int4_model
    engine = Engine(model, tok, max_batch=4, max_queue=8, cache=kv_cache_factory("8", "token"))

    def complete(prompt: str) -> str:
        body = {"model": "m", "prompt": prompt, "max_tokens": 24, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with TestClient(create_app(engine, "m")) as client:
        alone = [complete(p) for p in PROMPTS[:4]]
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(complete, PROMPTS[:4])) == alone
        assert client.get("/metrics?format=json").json()["errors"] == 0


def test_engine_serves_a_rotated_w4a8_model_batched_as_alone():
    """A rotated checkpoint with int8 activations and its rotated int4 KV cache (the CLI's default
    for it) behind continuous batching: each greedy text equals the request's text alone."""
    from quantkit import api
    from quantkit.checkpoint.formats import load_model
    from quantkit.cli.serve import kv_cache_factory

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load_model(FIXTURE)
        api.compress(model, "rtn", {"bits": 4, "group_size": -1, "rotate": True, "act_bits": 8}, pack=True)
        ids = [encode_prompt(tok, p) for p in PROMPTS[:4]]
        params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (14, 6, 20, 9)]
        engine = Engine(model, tok, max_batch=2, max_queue=8, cache=kv_cache_factory("4", None)).start()
        try:
            alone, batched = _texts_alone_and_batched(engine, ids, params)
            assert batched == alone and all(alone)
        finally:
            engine.stop()
    finally:
        torch.set_num_threads(old)
