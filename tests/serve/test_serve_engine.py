"""Continuous batching: batched KV row operations, batch == single-sequence outputs, queue bound, cancel."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from quantkit.runtime.generate import SamplingParams, encode_prompt, generate
from quantkit.serve import kvbatch
from quantkit.serve.engine import Engine, Event, QueueFull

FIXTURE = str(Path(__file__).resolve().parents[1] / "fixtures" / "stories260K")


class GatedModel:
    """The model behind a gate: forward calls block while the gate is closed; can fail once on demand."""

    def __init__(self, model):
        self.model, self.config, self.generation_config = model, model.config, model.generation_config
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False

    def __call__(self, *args, **kwargs):
        assert self.gate.wait(20), "gate never opened"
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return self.model(*args, **kwargs)


def _cache(rows: int, length: int, seed: int) -> DynamicCache:
    g = torch.Generator().manual_seed(seed)
    c = DynamicCache()
    for layer in range(2):
        c.update(torch.randn(rows, 2, length, 4, generator=g), torch.randn(rows, 2, length, 4, generator=g), layer)
    return c


def _wait(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_kvbatch_rows_are_left_padded_and_selected():
    a, b = _cache(2, 3, 0), _cache(1, 5, 1)
    a_keys, b_keys = a.layers[1].keys.clone(), b.layers[1].keys.clone()
    kvbatch.concat_rows(a, b)
    k = a.layers[1].keys  # [3, 2, 5, 4]
    assert k.shape == (3, 2, 5, 4) and kvbatch.seq_length(a) == 5
    assert torch.equal(k[:2, :, 2:], a_keys) and torch.equal(k[:2, :, :2], torch.zeros(2, 2, 2, 4))
    assert torch.equal(k[2:], b_keys)
    kvbatch.select_rows(a, torch.tensor([1]))
    kvbatch.drop_left(a, 2)
    assert torch.equal(a.layers[1].keys, a_keys[1:]) and a.layers[0].values.shape == (1, 2, 3, 4)


@pytest.mark.parametrize("runtime,packed", [("lean", False), ("transformers", False), ("lean", True)],
                         ids=["lean", "transformers", "lean-int4"])
def test_batched_greedy_equals_single_sequence(model_tok, runtime, packed):
    """The server's text is `generate`'s (issue 21, F7): on the lean batch (the default, generate's own
    forward) and on transformers' padded one, for a float and an int4 checkpoint."""
    model, tok = model_tok
    if packed:
        from quantkit import api

        api.compress(model, "rtn", {"bits": 4, "group_size": -1}, pack=True)
    prompts = ["", "Once upon", "The dog", "Lily and Tom went to the park. They", "A big red", "Sam", "One day",
               "The sun was hot and the"]
    params = [SamplingParams(max_new_tokens=n, stop=stop) for n, stop in
              [(40, ()), (20, ()), (45, ("ball",)), (50, ()), (10, ()), (35, ()), (25, ()), (30, ())]]
    refs = [generate(model, tok, encode_prompt(tok, p), sp) for p, sp in zip(prompts, params)]
    engine = Engine(model, tok, max_batch=3, max_queue=16, lean=runtime == "lean").start()  # 8 requests, 3 slots
    assert engine.runtime == runtime
    try:
        results = [None] * len(prompts)

        def run(i):
            time.sleep(0.005 * i)
            results[i] = engine.generate(encode_prompt(tok, prompts[i]), params[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for (text, reason, n), ref in zip(results, refs):
            assert (text, reason, n) == (ref.text, ref.finish_reason, ref.completion_tokens)
        stats = engine.stats()
        assert stats["running"] == 0 and stats["queued"] == 0
        assert stats["generated_tokens"] == sum(r.completion_tokens for r in refs)
    finally:
        engine.stop()


def test_batched_seeded_sampling_equals_single(model_tok):
    model, tok = model_tok
    ids = encode_prompt(tok, "Once")
    params = [SamplingParams(max_new_tokens=30, temperature=0.9, top_p=0.9, top_k=40, seed=s) for s in (3, 4, 5)]
    refs = [generate(model, tok, ids, p).text for p in params]
    engine = Engine(model, tok, max_batch=4).start()
    try:
        outs = [None] * 3
        threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, engine.generate(ids, params[i])[0]))
                   for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert outs == refs
    finally:
        engine.stop()


def test_queue_bound_and_cancel_free_slots(model_tok):
    model, tok = model_tok
    gated = GatedModel(model)
    engine = Engine(gated, tok, max_batch=1, max_queue=1).start()
    try:
        ids = encode_prompt(tok, "Once")
        events: queue.Queue[Event] = queue.Queue()
        gated.gate.clear()
        a = engine.submit(ids, SamplingParams(max_new_tokens=400, ignore_eos=True), events.put)
        _wait(lambda: engine.stats()["running"] == 1)  # A is in its prefill, blocked at the gate
        b = engine.submit(ids, SamplingParams(max_new_tokens=5), lambda ev: None)  # waits
        with pytest.raises(QueueFull, match="1 running and 1 queued"):  # A, in its prefill, counts as running
            engine.submit(ids, SamplingParams(max_new_tokens=5), lambda ev: None)
        assert engine.stats()["queued"] == 1
        b.cancel()  # a cancelled waiter leaves room
        c_events: queue.Queue[Event] = queue.Queue()
        engine.submit(ids, SamplingParams(max_new_tokens=5), c_events.put)
        gated.gate.set()
        assert events.get(timeout=10).kind == "delta"  # A runs
        a.cancel()  # cancel mid-generation: its slot goes to C
        kinds = []
        while not kinds or kinds[-1] != "done":
            kinds.append(c_events.get(timeout=10).kind)
        _wait(lambda: engine.stats()["running"] == 0)
        stats = engine.stats()
        assert stats["cancelled"] == 2 and stats["queued"] == 0 and stats["finished_length"] == 1  # A and B
    finally:
        gated.gate.set()
        engine.stop()


def test_a_failing_batched_forward_fails_the_batch_and_engine_keeps_serving(model_tok):
    """Only a failure of the shared decode forward fails every request in the batch."""
    model, tok = model_tok

    class FailsOnBatch(GatedModel):
        def __call__(self, input_ids, **kwargs):
            if input_ids.shape[0] > 1 and self.fail_batch:
                self.fail_batch = False
                raise RuntimeError("boom")
            return super().__call__(input_ids, **kwargs)

    gated = FailsOnBatch(model)
    engine = Engine(gated, tok, max_batch=4).start()
    try:
        gated.gate.clear()
        gated.fail_batch = True
        inboxes = [queue.Queue() for _ in range(2)]
        for q, prompt in zip(inboxes, ("Once", "The dog")):
            engine.submit(encode_prompt(tok, prompt), SamplingParams(max_new_tokens=5), q.put)
        gated.gate.set()
        for q in inboxes:
            events = [q.get(timeout=20)]
            while events[-1].kind == "delta":
                events.append(q.get(timeout=20))
            assert events[-1].kind == "error" and "boom" in events[-1].message
        text, reason, n = engine.generate(encode_prompt(tok, "Once upon"), SamplingParams(max_new_tokens=5))
        assert text == " a time, there was" and n == 5
        assert engine.stats()["errors"] == 2 and engine.stats()["running"] == 0
    finally:
        gated.gate.set()
        engine.stop()


def test_one_failing_sequence_ends_alone_and_the_batch_goes_on(model_tok, monkeypatch):
    """Audit E13: one request's sampling failure failed every request in the batch. Two rows' sampler
    raises (one at its first token, in the prefill; one mid-decode); a 1e-300 temperature row is greedy;
    the other rows finish with the text they give alone."""
    from quantkit.serve import engine as engine_mod

    model, tok = model_tok
    real, calls = engine_mod.sample_next, {13: 0, 14: 0}

    def poisoned(logits, params, generator=None):
        if params.seed in calls:
            calls[params.seed] += 1
            if params.seed == 14 or calls[13] == 3:
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_mod, "sample_next", poisoned)
    prompts = ["Once upon", "The dog", "Lily and Tom", "A big red"]
    greedy = [SamplingParams(max_new_tokens=20), SamplingParams(max_new_tokens=25),
              SamplingParams(max_new_tokens=20, temperature=1e-300), SamplingParams(max_new_tokens=15)]
    refs = [generate(model, tok, encode_prompt(tok, p), sp) for p, sp in zip(prompts, greedy)]
    gated = GatedModel(model)
    engine = Engine(gated, tok, max_batch=8).start()
    try:
        gated.gate.clear()  # everything is queued before the first step: one batch
        inboxes = []
        for ids, sp in [(encode_prompt(tok, p), sp) for p, sp in zip(prompts, greedy)] + [
                (encode_prompt(tok, "Once"), SamplingParams(max_new_tokens=30, temperature=0.9, seed=seed))
                for seed in (13, 14)]:
            inboxes.append(queue.Queue())
            engine.submit(ids, sp, inboxes[-1].put)
        gated.gate.set()
        outs = []
        for q in inboxes:
            events = [q.get(timeout=20)]
            while events[-1].kind == "delta":
                events.append(q.get(timeout=20))
            outs.append(("".join(e.text for e in events), events[-1]))
        for (text, last), ref in zip(outs, refs):
            assert last.kind == "done" and (text, last.completion_tokens) == (ref.text, ref.completion_tokens)
        for _, last in outs[4:]:
            assert last.kind == "error" and "probability tensor" in last.message
        assert calls[13] == 3 and len(outs[4][0]) > 0  # it failed mid-decode, after some text
        _wait(lambda: engine.stats()["running"] == 0)
        assert engine.stats()["errors"] == 2
    finally:
        gated.gate.set()
        engine.stop()


def test_a_failing_prefill_forward_ends_only_its_request(model_tok):
    """A request whose own (batch-1) prefill forward raises ends alone: the running request and the one
    admitted with it finish (before, it failed everything in flight)."""
    model, tok = model_tok
    bad = encode_prompt(tok, "The dog")

    class FailsOnBad(GatedModel):
        def __call__(self, input_ids, **kwargs):
            if input_ids.shape[0] == 1 and input_ids[0].tolist() == bad:
                raise RuntimeError("out of memory")
            return super().__call__(input_ids, **kwargs)

    gated = FailsOnBad(model)
    engine = Engine(gated, tok, max_batch=4).start()
    try:
        gated.gate.clear()
        inboxes = [queue.Queue() for _ in range(3)]
        engine.submit(encode_prompt(tok, "Once"), SamplingParams(max_new_tokens=6), inboxes[0].put)
        _wait(lambda: engine.stats()["running"] == 1)  # its prefill waits at the gate
        engine.submit(bad, SamplingParams(max_new_tokens=6), inboxes[1].put)  # these two are admitted together
        engine.submit(encode_prompt(tok, "Once upon"), SamplingParams(max_new_tokens=5), inboxes[2].put)
        gated.gate.set()
        finals = []
        for q in inboxes:
            events = [q.get(timeout=20)]
            while events[-1].kind == "delta":
                events.append(q.get(timeout=20))
            finals.append(events)
        assert [e[-1].kind for e in finals] == ["done", "error", "done"]
        assert "out of memory" in finals[1][-1].message
        assert "".join(e.text for e in finals[2]) == " a time, there was"
        _wait(lambda: engine.stats()["running"] == 0)
        assert engine.stats()["errors"] == 1
    finally:
        gated.gate.set()
        engine.stop()


class _QLayer:
    """A stand-in quantized KV layer: int8 values [B, H, T, D] and scales [B, H, T, 1]."""

    batch_tensors = ("qk", "sk")

    def __init__(self, rows, length, seed):
        g = torch.Generator().manual_seed(seed)
        self.qk = torch.randint(-127, 128, (rows, 2, length, 4), generator=g, dtype=torch.int8)
        self.sk = torch.rand(rows, 2, length, 1, generator=g)


class _QCache:
    def __init__(self, rows, length, seed):
        self.layers = [_QLayer(rows, length, seed + i) for i in range(2)]

    def get_seq_length(self):
        return self.layers[0].qk.shape[2]


def test_kvbatch_moves_every_declared_tensor_of_a_custom_layer():
    a, b = _QCache(1, 2, 0), _QCache(2, 4, 10)
    b_scales = b.layers[0].sk.clone()
    kvbatch.concat_rows(a, b)
    assert a.layers[0].qk.shape == (3, 2, 4, 4) and a.layers[0].qk.dtype == torch.int8
    assert a.layers[0].sk.shape == (3, 2, 4, 1) and torch.equal(a.layers[0].sk[1:], b_scales)
    assert not a.layers[1].sk[0, :, :2].any()  # the shorter row is left-padded with zeros
    kvbatch.select_rows(a, torch.tensor([2, 0]))
    assert torch.equal(a.layers[0].sk[0], b_scales[1])


def test_engine_uses_the_cache_factory_per_request(model_tok):
    model, tok = model_tok
    made = []

    def factory(m):
        made.append(DynamicCache(config=m.config))
        return made[-1]

    engine = Engine(model, tok, max_batch=4, cache=factory).start()
    try:
        for prompt in ("Once upon", "The dog"):
            ids = encode_prompt(tok, prompt)
            ref = generate(model, tok, ids, SamplingParams(max_new_tokens=12))
            assert engine.generate(ids, SamplingParams(max_new_tokens=12))[0] == ref.text
        assert len(made) == 2
    finally:
        engine.stop()
    with pytest.raises(TypeError):
        Engine(model, tok, cache=DynamicCache(config=model.config))


def _engine_texts(engine: Engine, ids: list[list[int]], params: SamplingParams, together: bool) -> list[str]:
    """Greedy texts of ``ids`` served one at a time, or all at once (joining the batch mid-decode)."""
    if not together:
        return [engine.generate(i, params)[0] for i in ids]
    out = [None] * len(ids)

    def run(k):
        time.sleep(0.01 * k)  # later prompts join while earlier ones decode: padding of every shape
        out[k] = engine.generate(ids[k], params)[0]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


@pytest.mark.parametrize("kind", ["float32", "int4", "int4-bf16"])
def test_greedy_text_alone_equals_batched(kind):
    """Audit E35: a greedy completion must not depend on what else is in the batch (rtn 4-bit
    per-channel: 2-9 of 96 staggered requests changed before; in bf16, 42 of 96)."""
    from quantkit import api
    from quantkit.checkpoint.formats import load_model

    model, tok = load_model(FIXTURE)
    if kind != "float32":
        api.compress(model, "rtn", {"bits": 4, "group_size": -1}, pack=True)
    if kind.endswith("bf16"):
        model = model.to(torch.bfloat16)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    prompts = ["Once upon", "There was a big tree", "Lily and Tom went to the park. They", "The dog", "Sam",
               "It was a rainy day. Mom said", "A big red", "The little bird wanted to fly over the"]
    ids = [encode_prompt(tok, p) for p in prompts]
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    engine = Engine(model, tok, max_batch=8, max_queue=16).start()
    try:
        assert engine.row_attention
        alone = _engine_texts(engine, ids, params, together=False)
        assert _engine_texts(engine, ids, params, together=True) == alone
    finally:
        engine.stop()
        torch.set_num_threads(old)


def test_lean_prefill_failure_ends_that_request_alone(model_tok, monkeypatch):
    from quantkit.serve.batch import LeanBatch

    model, tok = model_tok
    bad, good = encode_prompt(tok, "The dog"), encode_prompt(tok, "Once upon")
    real = LeanBatch.prefill

    def prefill(self, ids):
        if list(ids) == bad:
            raise RuntimeError("boom")
        return real(self, ids)

    monkeypatch.setattr(LeanBatch, "prefill", prefill)
    ref = generate(model, tok, good, SamplingParams(max_new_tokens=20))
    engine = Engine(model, tok, max_batch=4).start()
    try:
        q: queue.Queue = queue.Queue()
        engine.submit(bad, SamplingParams(max_new_tokens=5), q.put)
        assert engine.generate(good, SamplingParams(max_new_tokens=20))[0] == ref.text
        ev = q.get(timeout=20)
        assert ev.kind == "error" and "boom" in ev.message and engine.runtime == "lean"
    finally:
        engine.stop()
