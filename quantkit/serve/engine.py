"""Continuous batching engine: one thread runs a decode loop over the active sequences.

Each step feeds every active sequence's last token as one batch [B, 1] through the model with a
shared KV cache whose rows are left-padded to a common length: the attention mask hides the padding
and position ids are per row. A new request is prefilled on its own (batch 1, the same call
`quantkit.runtime.generate` makes), then its cache rows join the batch (`kvbatch.concat_rows`); a
finished or cancelled sequence leaves at the end of the step (`kvbatch.select_rows`). Requests
beyond ``max_batch`` wait in a bounded queue; `submit` raises `QueueFull` when that is full.

What the other rows of a batch change in a row's numbers: attention runs row by row on the unpadded
keys (`quantkit.runtime.rowwise`, for transformers' ``sdpa`` attention) and the CPU runtime's int4
and int8 weight kernels compute each row on its own, so when every matmul runs on them (a quantized
model with a quantized ``lm_head``) a row's logits are bitwise those it gets alone. Float matmuls
(an unquantized model, a float ``lm_head``) come from the BLAS, which picks its kernel by the number
of rows: their logits differ from a lone row's by float rounding (at most ~2e-5 in float32 on
stories260K, tested under 1e-4), which changes a greedy token only at a near-exact tie. A quantized
KV cache (``cache=``, ``serve --kv-bits``) quantizes each row's tokens on their own (per token, or in
a batch-1 cache per row for KIVI's ``channel`` keys, `quantkit.runtime.kvcache`), so it keeps a row's
keys and values those it gets alone.
``max_batch=1`` decodes every request alone.

Failures are contained: an exception in one request's own work (its prefill forward, sampling its
token, detokenizing) ends that request alone with an error event; only a failure of the shared batch
(the batched decode forward, the shared KV cache) fails every active request.

Events go back through the request's ``on_event`` callback, called from the engine thread:
``Event("delta", text=...)`` as text becomes final, then one ``Event("done", finish_reason=...)``
(or ``Event("error", message=...)``).
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from quantkit.runtime.generate import (
    CacheFactory,
    SamplingParams,
    TextStream,
    context_length,
    eos_token_ids,
    make_cache,
    make_generator,
    model_device,
    sample_next,
)
from quantkit.runtime.rowwise import use_row_attention
from quantkit.serve import kvbatch

log = logging.getLogger("quantkit.serve")


class QueueFull(Exception):
    """The wait queue is at max_queue."""


class EngineStopped(Exception):
    """The engine is not running."""


@dataclass
class Event:
    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""


class Request:
    """A submitted generation; `cancel()` from any thread frees its slot at the next step."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, on_event: Callable[[Event], None]):
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_event = on_event
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Seq:
    """Engine-side state of one active sequence."""

    def __init__(self, req: Request, tokenizer, eos: frozenset[int]):
        self.req = req
        self.params = req.params
        self.stream = TextStream(tokenizer, req.prompt_ids, req.params.stop)
        self.generator = None if req.params.greedy else make_generator(req.params.seed)
        self.eos = frozenset() if req.params.ignore_eos else eos
        self.cached = 0  # tokens in the KV cache for this row (no padding)
        self.last = -1  # last sampled token, fed at the next step
        self.n_new = 0
        self.done = False


class Engine:
    """Continuous batching over a causal LM. Thread-safe `submit`; call `start()` first.

    >>> engine = Engine(model, tokenizer, max_batch=16, max_queue=64).start()
    >>> req = engine.submit(ids, SamplingParams(max_new_tokens=32), on_event=print)
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64,
                 cache: CacheFactory | None = None, rate_window: float = 10.0):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model = model
        self.device = model_device(model)  # token ids, positions and masks are made there
        self.tokenizer = tokenizer  # for callers (encoding requests on their own threads)
        # the engine thread detokenizes with its own copy: a Rust tokenizer shared across threads can
        # fail with "Already borrowed" when one thread changes its padding/truncation state
        self._detok = copy.deepcopy(tokenizer)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.n_ctx = context_length(model)
        # padded decode steps attend row by row (see the module docstring); False: another attention
        self.row_attention = use_row_attention(model)
        if not self.row_attention:
            log.info("attention %r is not computed row by row: batched rows may differ from lone ones by rounding",
                     getattr(model.config, "_attn_implementation", None))
        if cache is not None and not callable(cache):
            raise TypeError("Engine takes a KV cache factory (model -> Cache), not a cache object")
        self._cache_factory = cache  # None: a float DynamicCache per request
        self._eos = eos_token_ids(model, tokenizer)
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._active: list[_Seq] = []
        self._admitting = 0  # taken from the queue, prefill not done yet
        self._kv = None  # the batched cache of self._active, rows in the same order
        self._thread: threading.Thread | None = None
        self._stop = False
        # metrics
        self._rate_window = rate_window
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated in that step)
        self._started_at = time.monotonic()
        self.counters = {"generated_tokens": 0, "prompt_tokens": 0, "steps": 0,
                         "finished_stop": 0, "finished_length": 0, "cancelled": 0, "errors": 0}

    # ------------------------------------------------------------------ public API

    def start(self) -> Engine:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="quantkit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               on_event: Callable[[Event], None]) -> Request:
        """Queue a generation. Raises QueueFull when max_queue requests already wait."""
        if not prompt_ids or len(prompt_ids) >= self.n_ctx:
            raise ValueError(f"prompt must have 1..{self.n_ctx - 1} tokens, got {len(prompt_ids)}")
        req = Request(prompt_ids, params, on_event)
        with self._cond:
            if self._thread is None or self._stop:
                raise EngineStopped("engine is not running")
            if len(self._waiting) >= self.max_queue:
                self._drop_cancelled_waiting()
            # a request the engine can take at once does not count against the queue
            free_slots = self.max_batch - len(self._active) - self._admitting
            if len(self._waiting) - max(free_slots, 0) >= self.max_queue:
                running = sum(not s.done for s in self._active) + self._admitting  # as stats() counts them
                raise QueueFull(f"server busy: {running} running and {len(self._waiting)} queued")
            self._waiting.append(req)
            self._cond.notify_all()
        return req

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, timeout: float = 600.0):
        """Blocking helper: (text, finish_reason, completion_tokens) of one request."""
        import queue

        q: queue.Queue[Event] = queue.Queue()
        self.submit(prompt_ids, params, q.put)
        pieces = []
        while True:
            ev = q.get(timeout=timeout)
            if ev.kind == "delta":
                pieces.append(ev.text)
            elif ev.kind == "done":
                return "".join(pieces), ev.finish_reason, ev.completion_tokens
            else:
                raise RuntimeError(ev.message)

    def stats(self) -> dict:
        now = time.monotonic()
        with self._cond:
            while self._recent and self._recent[0][0] < now - self._rate_window:
                self._recent.popleft()
            recent = sum(n for _, n in self._recent)
            span = min(self._rate_window, max(now - self._started_at, 1e-6))
            queued = sum(not r.cancelled for r in self._waiting)
            running = sum(not s.done for s in self._active) + self._admitting
            return {"running": running, "queued": queued, "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "tokens_per_second": recent / span, **self.counters}

    # ------------------------------------------------------------------ engine thread

    def _drop_cancelled_waiting(self) -> None:
        """Forget queued requests whose client went away (call with the lock held)."""
        kept = deque(r for r in self._waiting if not r.cancelled)
        self.counters["cancelled"] += len(self._waiting) - len(kept)
        self._waiting = kept

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stop and not self._waiting and not self._active:
                        self._cond.wait()
                    if self._stop:
                        break
                    self._drop_cancelled_waiting()
                    admit = []
                    while self._waiting and len(self._active) + len(admit) < self.max_batch:
                        admit.append(self._waiting.popleft())
                    self._admitting = len(admit)
                try:
                    for req in admit:
                        self._prefill(req)
                    self._retire()
                    if self._active:
                        self._decode_step()
                except Exception as e:  # a model failure: fail the batch, keep serving
                    log.exception("engine step failed")
                    failed = [s.req for s in self._active if not s.done] + admit[len(admit) - self._admitting:]
                    with self._cond:
                        self.counters["errors"] += len(failed)
                        self._active, self._kv, self._admitting = [], None, 0
                    for req in failed:
                        _deliver(req, Event("error", message=f"generation failed: {type(e).__name__}: {e}"))
                self._retire()
        with self._cond:
            left = [s.req for s in self._active if not s.done] + list(self._waiting)
            self._active, self._kv, self._waiting = [], None, deque()
        for req in left:
            _deliver(req, Event("error", message="server shutting down"))

    def _prefill(self, req: Request) -> None:
        """Prefill one request on its own, sample its first token, and join it to the batch. A failure of
        its own forward ends this request alone; one while joining the shared cache fails the batch."""
        try:
            s = _Seq(req, self._detok, self._eos)
            kv = make_cache(self.model, self._cache_factory)
            ids = torch.tensor([req.prompt_ids], device=self.device)  # [1, L]
            logits = self.model(ids, past_key_values=kv, use_cache=True, logits_to_keep=1).logits[0, -1].float()
        except Exception as e:
            with self._cond:
                self._admitting -= 1
            self._fail(req, e)
            return
        s.cached = len(req.prompt_ids)
        with self._cond:
            self.counters["prompt_tokens"] += s.cached
            self._active.append(s)
            self._admitting -= 1
        if self._kv is None:
            self._kv = kv
        else:
            kvbatch.concat_rows(self._kv, kv)
        self._count_step(self._take(s, logits, int(logits.argmax())))

    def _decode_step(self) -> None:
        """One token for every active sequence."""
        active = self._active
        T = kvbatch.seq_length(self._kv)
        cached = torch.tensor([s.cached for s in active], device=self.device)  # [B]
        pad = T - cached  # [B] left padding of each row
        mask = (torch.arange(T + 1, device=self.device)[None, :] >= pad[:, None]).long()  # [B, T+1]
        input_ids = torch.tensor([[s.last] for s in active], device=self.device)  # [B, 1]
        out = self.model(input_ids, attention_mask=mask, position_ids=cached[:, None], past_key_values=self._kv,
                         use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()  # [B, V]
        greedy_tokens = logits.argmax(-1).tolist()
        n = 0
        for i, s in enumerate(active):
            s.cached += 1
            if s.done or s.req.cancelled:  # dropped in _retire
                continue
            n += self._take(s, logits[i], greedy_tokens[i])
        self._count_step(n)

    def _take(self, s: _Seq, logits: torch.Tensor, greedy_token: int) -> int:
        """Pick `s`'s next token from its logits [V] (``greedy_token``: their argmax) and take it; 1 if it
        did. An exception here (sampling, detokenizing) ends `s` alone with an error; the other rows go on."""
        try:
            tok = greedy_token if s.params.greedy else sample_next(logits, s.params, s.generator)
            with self._cond:  # counted before its events go out: a finished request's tokens are in the stats
                self.counters["generated_tokens"] += 1
            self._advance(s, tok)
            return 1
        except Exception as e:
            if not s.done:  # (a row that finished has had its last event)
                s.done = True  # _retire drops its row
                self._fail(s.req, e)
            return 0

    def _fail(self, req: Request, e: Exception) -> None:
        """End one request with an error event (its row, if any, must already be marked done)."""
        log.error("request %d failed: %s: %s", req.id, type(e).__name__, e, exc_info=e)
        with self._cond:
            self.counters["errors"] += 1
        _deliver(req, Event("error", message=f"generation failed: {type(e).__name__}: {e}"))

    def _advance(self, s: _Seq, tok: int) -> None:
        """Take a sampled token: emit text, decide whether the sequence is finished."""
        if tok in s.eos:
            self._finish(s, s.stream.flush(), "stop")
            return
        s.n_new += 1
        s.last = tok
        delta = s.stream.push(tok)
        if s.stream.stopped:
            self._finish(s, delta, "stop")
        elif s.n_new >= s.params.max_new_tokens or s.cached + 1 >= self.n_ctx:
            self._finish(s, delta + s.stream.flush(), "length")
        elif delta:
            self._emit(s, Event("delta", text=delta))

    def _finish(self, s: _Seq, delta: str, reason: str) -> None:
        s.done = True
        if delta:
            self._emit(s, Event("delta", text=delta))
        self._emit(s, Event("done", finish_reason=reason, prompt_tokens=len(s.req.prompt_ids),
                            completion_tokens=s.n_new))
        with self._cond:
            self.counters[f"finished_{reason}"] += 1

    def _emit(self, s: _Seq, ev: Event) -> None:
        _deliver(s.req, ev)  # a failed delivery cancels the request; _retire drops it

    def _retire(self) -> None:
        """Drop finished and cancelled rows from the batch and trim all-padding columns."""
        for s in self._active:
            if s.req.cancelled and not s.done:
                s.done = True
                with self._cond:
                    self.counters["cancelled"] += 1
        keep = [i for i, s in enumerate(self._active) if not s.done]
        if len(keep) == len(self._active):
            return
        with self._cond:
            self._active = [self._active[i] for i in keep]
        if not keep:
            self._kv = None
            return
        kvbatch.select_rows(self._kv, torch.tensor(keep))
        T = kvbatch.seq_length(self._kv)
        kvbatch.drop_left(self._kv, T - max(s.cached for s in self._active))

    def _count_step(self, n: int) -> None:
        """One model step that generated n tokens (for the steps counter and the tokens/s window)."""
        now = time.monotonic()
        with self._cond:
            self.counters["steps"] += 1
            self._recent.append((now, n))
            while self._recent[0][0] < now - self._rate_window:
                self._recent.popleft()


def _deliver(req: Request, ev: Event) -> bool:
    """Call the request's callback; a receiver that is gone (e.g. its event loop closed) cancels it."""
    try:
        req.on_event(ev)
        return True
    except Exception:
        log.warning("request %d: event delivery failed; cancelling it", req.id, exc_info=True)
        req.cancel()
        return False
