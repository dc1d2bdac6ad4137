"""The OpenAI-compatible HTTP app (FastAPI) in front of an `Engine`.

    >>> app = create_app(Engine(model, tokenizer, max_batch=16), model_name="stories260K")  # starts with the app
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: GET /health, /v1/models, /metrics (Prometheus text; ``?format=json`` for JSON);
POST /v1/completions and /v1/chat/completions (``"stream": true`` for server-sent events ending
with ``data: [DONE]``). Every error is an OpenAI error body with a 4xx/5xx status. Requests pass
:mod:`quantkit.serve.security` first (API key, browser origins, ``Host``, JSON content type).

The event loop only moves bytes: a request body is read as it arrives (413 past `MAX_BODY_BYTES`,
chunked or not), then parsed, validated and tokenized in one worker thread (one, because a Rust
tokenizer shared between threads can fail with "Already borrowed"), so a large body never stalls
other clients or /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import State
from starlette.exceptions import HTTPException as StarletteHTTPException

from quantkit.serve import protocol, security
from quantkit.serve.engine import Engine, EngineStopped, Event, QueueFull
from quantkit.serve.protocol import ApiError, GenRequest
from quantkit.serve.security import Security

log = logging.getLogger("quantkit.serve")

CLIENT_GONE = "client disconnected"
MAX_BODY_BYTES = 16 << 20


class _Inbox:
    """Engine events of one HTTP request's choices (``n`` engine requests), handed from the engine
    thread to the event loop as ``(choice index, Event)``; index -1: the client went away."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def sink(self, index: int):
        """The ``on_event`` callback of choice ``index`` (called on the engine thread)."""
        return lambda ev: self._loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev))

    async def next_events(self) -> list[tuple[int, str, list, Event | None]]:
        """Wait for events; return what is available as ``(index, text, logprobs, final event or None)``
        per choice, its deltas coalesced."""
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        out: dict[int, list] = {}
        for index, ev in items:
            entry = out.setdefault(index, ["", [], None])
            if entry[2] is not None:  # nothing follows a choice's final event
                continue
            entry[0] += ev.text
            entry[1] += ev.logprobs
            if ev.kind != "delta":
                entry[2] = ev
        return [(index, *entry) for index, entry in out.items()]


def _error_response(e: ApiError, app_state) -> JSONResponse:
    app_state.rejected[e.status] = app_state.rejected.get(e.status, 0) + 1
    return JSONResponse(e.body(), status_code=e.status)


@dataclass
class _Served:
    """What every route reads: the engine, the served model's name and creation time, the app
    state that counts refused requests, the longest string prompt (characters) worth tokenizing, and
    the thread that parses and tokenizes requests."""

    engine: Engine
    model_name: str
    created: int
    state: State
    max_prompt_chars: int
    parser: ThreadPoolExecutor


def create_app(engine: Engine, model_name: str, checks: Security | None = None) -> FastAPI:
    """The FastAPI app serving `engine`'s model under the name `model_name`, behind ``checks``
    (API key, browser origins, ``Host``; default `Security()`: no key, no cross-origin browser request)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()
        served.parser.shutdown(wait=False)

    app = FastAPI(title="quantkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.rejected = {}  # HTTP status -> count of refused requests
    served = _Served(engine, model_name, int(time.time()), app.state,
                     protocol.max_prompt_chars(engine.tokenizer, engine.n_ctx),
                     ThreadPoolExecutor(1, thread_name_prefix="quantkit-parse"))
    security.install(app, checks or Security(), rejected=app.state.rejected)
    _add_error_handlers(app)
    _add_info_routes(app, served)
    _add_generation_routes(app, served)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, routing ones included, as an OpenAI error body (counted in ``/metrics``)."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(ApiError(exc.status_code, str(exc.detail), code=code), app.state)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"),
                               app.state)


def _add_info_routes(app: FastAPI, served: _Served) -> None:
    """GET /health, /v1/models, /v1/models/{name}, /metrics."""

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": served.model_name, "object": "model", "created": served.created,
                          "owned_by": "quantkit", "max_model_len": served.engine.n_ctx}]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        if name != served.model_name:
            return _error_response(ApiError(404, f"The model '{name}' does not exist", param="model",
                                            code="model_not_found"), served.state)
        return {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "quantkit"}

    @app.get("/metrics")
    async def metrics(format: str = "prometheus"):
        stats = served.engine.stats()
        stats["rejected"] = dict(served.state.rejected)
        if format == "json":
            return stats
        return PlainTextResponse(_prometheus(stats), media_type="text/plain; version=0.0.4")


def _add_generation_routes(app: FastAPI, served: _Served) -> None:
    """POST /v1/completions and /v1/chat/completions."""

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(served, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _handle(served, request, chat=True)


async def _handle(served: _Served, request: Request, chat: bool):
    """Parse and submit one request; answer it whole or as a server-sent event stream."""
    engine = served.engine
    try:
        raw = await _read_body(request)
        loop = asyncio.get_running_loop()
        req = await loop.run_in_executor(served.parser, _parse_request, served, raw, chat)
        inbox = _Inbox(loop)
        handle = _submit(engine, req, inbox)
    except ApiError as e:
        return _error_response(e, served.state)
    if req.stream:
        return StreamingResponse(_stream(req, handle, inbox, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(request, req, handle, inbox, chat)


class _Handles:
    """The engine requests of one HTTP request's ``n`` choices; `cancel` cancels them all."""

    def __init__(self):
        self.requests = []

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()


def _submit(engine: Engine, req: GenRequest, inbox: _Inbox) -> _Handles:
    """One engine request per choice (choice i seeded with seed + i); all or none are queued."""
    handles = _Handles()
    if req.n > engine.max_batch + engine.max_queue:
        raise ApiError(400, f"'n' = {req.n} is more than this server runs and queues at once "
                            f"({engine.max_batch} + {engine.max_queue})", param="n", code="invalid_value")
    try:
        for i in range(req.n):
            params = req.params
            if i and params.seed is not None:
                params = dataclasses.replace(params, seed=(params.seed + i) % 2**64)
            handles.requests.append(engine.submit(req.prompt_ids, params, inbox.sink(i)))
    except QueueFull as e:
        handles.cancel()
        raise ApiError(503, f"{e}; retry later", type="server_overloaded", code="queue_full") from None
    except EngineStopped as e:
        handles.cancel()
        raise ApiError(503, str(e), type="server_error", code="engine_stopped") from None
    return handles


def _logprobs_object(req: GenRequest, chat: bool, entries: list, offset: int) -> dict | None:
    if req.params.logprobs is None:
        return None
    return protocol.chat_logprobs(entries) if chat else protocol.completion_logprobs(entries, offset)


async def _read_body(request: Request) -> bytearray:
    """The body, read as it arrives: 413 as soon as it passes MAX_BODY_BYTES, whether a Content-Length
    announced it or not (a chunked body has none; it was read whole, audit E19b)."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise _body_too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _body_too_large()  # the rest is never read: the server closes the connection
    return body


def _body_too_large() -> ApiError:
    return ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large")


def _parse_request(served: _Served, raw: bytearray, chat: bool) -> GenRequest:
    """The body as a validated request with its prompt tokenized (in the parser thread)."""
    parse = protocol.parse_chat if chat else protocol.parse_completion
    return parse(protocol.parse_json_body(raw), served.engine.tokenizer, served.model_name, served.engine.n_ctx,
                 max_chars=served.max_prompt_chars)


async def _collect(request: Request, req: GenRequest, handle: _Handles, inbox: _Inbox, chat: bool):
    """The whole answer as one JSON body; a client that disconnects first cancels its request."""

    async def watch_disconnect():  # a client that gives up frees its slots
        message = await request.receive()
        while message["type"] != "http.disconnect":  # each receive waits for the next ASGI message
            message = await request.receive()
        handle.cancel()
        inbox.queue.put_nowait((-1, Event("error", message=CLIENT_GONE)))

    watcher = asyncio.create_task(watch_disconnect())
    texts, lps = [[] for _ in range(req.n)], [[] for _ in range(req.n)]
    finals: dict[int, Event] = {}
    try:
        while len(finals) < req.n:
            for index, text, logprobs, final in await inbox.next_events():
                if final is not None and final.kind == "error":
                    status = 499 if final.message == CLIENT_GONE else 500
                    return JSONResponse(protocol.error_body(final.message, type="server_error"), status_code=status)
                texts[index].append(text)
                lps[index] += logprobs
                if final is not None:
                    finals[index] = final
    finally:
        watcher.cancel()
        handle.cancel()  # no-op for finished choices
    choice = protocol.chat_choice if chat else protocol.completion_choice
    choices = [choice(i, "".join(texts[i]), finals[i].finish_reason, _logprobs_object(req, chat, lps[i], 0))
               for i in range(req.n)]
    build = protocol.chat_body if chat else protocol.completion_body
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    return build(rid, req.model, choices, finals[0].prompt_tokens, sum(f.completion_tokens for f in finals.values()))


async def _stream(req: GenRequest, handle: _Handles, inbox: _Inbox, chat: bool) -> AsyncIterator[bytes]:
    """Server-sent events: text chunks as they come (each naming its choice), each choice's finish
    chunk, then the usage (if asked) and ``[DONE]``."""
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    offsets = [0] * req.n  # characters sent per choice (completions' text_offset)

    def chunk(index: int, text: str, finish: str | None = None, first: bool = False, logprobs: list = ()) -> bytes:
        lp = _logprobs_object(req, chat, list(logprobs), offsets[index]) if logprobs else None
        offsets[index] += len(text)
        if chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return protocol.sse(protocol.chat_chunk(rid, req.model, created, delta, finish, index, lp))
        return protocol.sse(protocol.completion_chunk(rid, req.model, created, text, finish, index, lp))

    finals: dict[int, Event] = {}
    try:
        if chat:
            for i in range(req.n):
                yield chunk(i, "", first=True)
        while len(finals) < req.n:
            for index, text, logprobs, final in await inbox.next_events():
                if text or logprobs:
                    yield chunk(index, text, logprobs=logprobs)
                if final is None:
                    continue
                if final.kind == "error":
                    yield protocol.sse(protocol.error_body(final.message, type="server_error"))
                    yield protocol.sse("[DONE]")
                    return
                finals[index] = final
                yield chunk(index, "", final.finish_reason)
        if req.include_usage:
            yield protocol.sse(protocol.usage_chunk(rid, req.model, created, obj, finals[0].prompt_tokens,
                                                    sum(f.completion_tokens for f in finals.values())))
        yield protocol.sse("[DONE]")
    finally:
        handle.cancel()  # the client disconnected (this generator was cancelled) or we are done


def _prometheus(stats: dict) -> str:
    rows = [
        ("quantkit_tokens_per_second", "gauge", "Generated tokens per second over the recent window.",
         [("", stats["tokens_per_second"])]),
        ("quantkit_requests_running", "gauge", "Sequences in the decode batch.", [("", stats["running"])]),
        ("quantkit_requests_queued", "gauge", "Requests waiting for a batch slot.", [("", stats["queued"])]),
        ("quantkit_max_batch", "gauge", "Batch slots.", [("", stats["max_batch"])]),
        ("quantkit_max_queue", "gauge", "Queue capacity.", [("", stats["max_queue"])]),
        ("quantkit_generated_tokens_total", "counter", "Tokens generated.", [("", stats["generated_tokens"])]),
        ("quantkit_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", stats["prompt_tokens"])]),
        ("quantkit_decode_steps_total", "counter", "Model forward calls.", [("", stats["steps"])]),
        ("quantkit_requests_finished_total", "counter", "Finished requests by reason.",
         [('{reason="stop"}', stats["finished_stop"]), ('{reason="length"}', stats["finished_length"]),
          ('{reason="cancelled"}', stats["cancelled"]), ('{reason="error"}', stats["errors"])]),
        ("quantkit_requests_rejected_total", "counter", "Refused requests by HTTP status.",
         [(f'{{status="{k}"}}', v) for k, v in sorted(stats["rejected"].items())]),
    ]
    lines = []
    for name, kind, help_, samples in rows:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                  for labels, value in samples]
    return "\n".join(lines) + "\n"
