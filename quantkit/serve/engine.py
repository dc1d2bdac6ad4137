"""Continuous batching engine: one thread runs a decode loop over the active sequences.

Each step feeds every active sequence's last token as one batch [B, 1] through the model (one
token per sequence per step). A new request is prefilled on its own, its first token sampled, then
its row joins the batch; a finished or cancelled sequence leaves at the end of the step. Requests
beyond ``max_batch`` wait in a bounded queue; `submit` raises `QueueFull` when that is full.

The batch (`quantkit.serve.batch`) runs on quantkit's lean forward wherever ``quantkit generate``
does (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3 without a quantized KV cache): one static cache row per sequence
at its own position, and a lone sequence takes generate's own step (on a float32 int4 checkpoint with
the native kernels, the one-call native decode step), so at batch 1 the server decodes what and as
fast as ``generate``; a bf16 checkpoint's lone row stays on the torch ops (the native step's float32
stream is not what its batched rows compute), slower than ``generate`` where the native step runs. Rows decoded together go through the same modules with the other rows beside
them: float and int8/int4 matmuls compute each row on its own, attention is masked per row, so a
row's logits match those it gets alone to float rounding (tested), which changes a greedy token only
at a near-exact tie.

Other models, ``lean=False`` and a quantized KV cache run transformers' forward over one cache
whose rows are left-padded to a common length (`kvbatch`): the attention mask hides the padding and
position ids are per row. There attention runs row by row on the unpadded keys
(`quantkit.runtime.rowwise`, for transformers' ``sdpa`` attention) and the CPU runtime's int4 and
int8 weight kernels compute each row on its own, so when every matmul runs on them (a quantized
model with a quantized ``lm_head``) a row's logits are bitwise those it gets alone. Float matmuls
come from the BLAS, which picks its kernel by the number of rows: their logits differ from a lone
row's by float rounding. A quantized KV cache (``cache=``, ``serve --kv-bits``) quantizes each row's
tokens on their own (per token, or in a batch-1 cache per row for KIVI's ``channel`` keys,
`quantkit.runtime.kvcache`), so it keeps a row's keys and values those it gets alone.
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
from dataclasses import dataclass, field

import torch

from quantkit.runtime.generate import (
    CacheFactory,
    SamplingParams,
    TextStream,
    context_length,
    eos_token_ids,
    make_generator,
    sample_next,
)
from quantkit.runtime.rowwise import use_row_attention
from quantkit.serve.batch import batch_for
from quantkit.serve.logprobs import TokenLogprob, token_entry

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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens taken since the last event


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
        self.logprobs: list[TokenLogprob] = []  # taken, not yet sent (requests with params.logprobs)
        self.recent = list(req.prompt_ids[-4:])  # the ids before the next token: its text is read after them


class Engine:
    """Continuous batching over a causal LM. Thread-safe `submit`; call `start()` first.

    >>> engine = Engine(model, tokenizer, max_batch=16, max_queue=64).start()
    >>> req = engine.submit(ids, SamplingParams(max_new_tokens=32), on_event=print)
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64,
                 cache: CacheFactory | None = None, rate_window: float = 10.0, lean: bool = True):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model = model
        self.tokenizer = tokenizer  # for callers (encoding requests on their own threads)
        # the engine thread detokenizes with its own copy: a Rust tokenizer shared across threads can
        # fail with "Already borrowed" when one thread changes its padding/truncation state
        self._detok = copy.deepcopy(tokenizer)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.n_ctx = context_length(model)
        if cache is not None and not callable(cache):
            raise TypeError("Engine takes a KV cache factory (model -> Cache), not a cache object")
        self._batch = batch_for(model, cache, lean, self.n_ctx)  # None cache: float keys and values
        self.runtime = self._batch.kind  # "lean" or "transformers"
        # padded decode steps attend row by row (see the module docstring); False: another attention
        self.row_attention = self.runtime == "lean" or use_row_attention(model)
        if not self.row_attention:
            log.info("attention %r is not computed row by row: batched rows may differ from lone ones by rounding",
                     getattr(model.config, "_attn_implementation", None))
        self._eos = eos_token_ids(model, tokenizer)
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._active: list[_Seq] = []
        self._admitting = 0  # taken from the queue, prefill not done yet
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
                        self._active, self._admitting = [], 0
                        self._batch.clear()
                    for req in failed:
                        _deliver(req, Event("error", message=f"generation failed: {type(e).__name__}: {e}"))
                self._retire()
        with self._cond:
            left = [s.req for s in self._active if not s.done] + list(self._waiting)
            self._active, self._waiting = [], deque()
            self._batch.clear()
        for req in left:
            _deliver(req, Event("error", message="server shutting down"))

    def _prefill(self, req: Request) -> None:
        """Prefill one request on its own, sample its first token, and join it to the batch. A failure of
        its own forward ends this request alone; one while joining the shared cache fails the batch."""
        try:
            s = _Seq(req, self._detok, self._eos)
            logits, pending = self._batch.prefill(req.prompt_ids)
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
        self._batch.add(pending)
        self._count_step(self._take(s, logits, int(logits.argmax())))

    def _decode_step(self) -> None:
        """One token for every active sequence."""
        active = self._active
        logits = self._batch.step([s.last for s in active], [s.cached for s in active])  # [B, V]
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
            if s.params.logprobs is not None and tok not in s.eos:
                s.logprobs.append(self._logprob(s, logits, tok))
            with self._cond:  # counted before its events go out: a finished request's tokens are in the stats
                self.counters["generated_tokens"] += 1
            self._advance(s, tok)
            return 1
        except Exception as e:
            if not s.done:  # (a row that finished has had its last event)
                s.done = True  # _retire drops its row
                self._fail(s.req, e)
            return 0

    def _logprob(self, s: _Seq, logits: torch.Tensor, tok: int) -> TokenLogprob:
        entry = token_entry(self._detok, s.recent, logits, tok, s.params.logprobs)
        s.recent = s.recent[1:] + [tok] if len(s.recent) >= 4 else s.recent + [tok]
        return entry

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
        if s.logprobs:
            ev.logprobs, s.logprobs = s.logprobs, []
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
        cached = [s.cached for s in self._active]
        with self._cond:
            self._active = [self._active[i] for i in keep]
        self._batch.keep(keep, cached)

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
