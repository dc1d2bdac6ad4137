"""OpenAI API shapes: request validation into (prompt ids, SamplingParams), response and chunk bodies.

No web framework here: functions of dicts, so the checks can be tested without a server. Every
rejection is an `ApiError` carrying the status and the OpenAI error body
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from quantkit.errors import QuantkitError
from quantkit.runtime.generate import MAX_LOGPROBS, SamplingParams, encode_chat, encode_prompt

MAX_STOP = 4  # as OpenAI
MAX_N = 16  # choices per request
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MIN_CHARS_PER_TOKEN = 16  # the floor of the characters-per-token bound of `max_prompt_chars`


class ApiError(Exception):
    """A request the server refuses; `status` is the HTTP status, `body()` the OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse_json_body(raw: bytes | bytearray) -> dict:
    """The request body as a JSON object; 400 for invalid UTF-8, malformed JSON or a non-object, JSON
    nested deeper than Python's recursion limit, or an integer past Python's digit limit (4300)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8: {e.reason} at byte {e.start}",
                       code="invalid_utf8") from None
    try:
        body = json.loads(text)  # the C scanner raises RecursionError past the limit; it never overflows
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON in request body: {e.msg} (line {e.lineno}, column {e.colno})",
                       code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion..."
        raise ApiError(400, f"a number in the request body is too long: {str(e).split(';')[0]}",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


# ------------------------------------------------------------------------------------------ fields


def _invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _text(value, param: str) -> str:
    """A string that is valid Unicode (JSON escapes can smuggle in lone surrogates)."""
    if not isinstance(value, str):
        raise _invalid(param, f"'{param}' must be a string", "invalid_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(param, f"'{param}' is not valid UTF-8 (lone surrogate)", "invalid_utf8") from None
    return value


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _invalid(name, f"'{name}' must be an integer", "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise _invalid(name, f"'{name}' must be {bounds}, got {v}")
    return v


def _float(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _invalid(name, f"'{name}' must be a number", "invalid_type")
    if v > hi or v < lo or (lo_open and v == lo):
        raise _invalid(name, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _invalid(name, f"'{name}' must be a boolean", "invalid_type")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > MAX_STOP:
        raise _invalid("stop", f"'stop' must be a string or a list of at most {MAX_STOP} strings")
    out = tuple(_text(s, "stop") for s in items)
    if any(not s for s in out):
        raise _invalid("stop", "'stop' strings must not be empty")
    return out


# What a request may carry.  HONORED keys are read; NEUTRAL ones only at the values that change
# nothing (anything else is a 400 naming the key, as vLLM and OpenAI answer, rather than a silently
# different completion: ecosystem audit F11); BOOKKEEPING ones never change the text.  Any other
# key is refused as OpenAI refuses it ("Unrecognized request argument supplied").
HONORED = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stream", "stream_options", "stop",
           "ignore_eos", "n", "logprobs"}
HONORED_BY = {"completions": {"prompt"}, "chat": {"messages", "top_logprobs"}}
NEUTRAL = {"best_of": (1,), "echo": (False,), "top_logprobs": (0,),
           "presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,), "min_p": (0,),
           "logit_bias": ({},), "suffix": ("",), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
           "function_call": ("none",), "response_format": ({"type": "text"},), "length_penalty": (1,)}
NEUTRAL_MESSAGES = {"best_of": "only best_of=1 is supported", "echo": "echo is not supported",
                    "top_logprobs": "'top_logprobs' is a chat parameter; completions take 'logprobs': N",
                    "tools": "tools are not supported",
                    "functions": "tools are not supported"}
BOOKKEEPING = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}


def _unsupported(body: dict, endpoint: str) -> None:
    for key, value in body.items():
        if value is None or key in HONORED or key in HONORED_BY[endpoint] or key in BOOKKEEPING:
            continue
        if key in NEUTRAL:
            if not any(value == ok and type(value) is not bool or value is ok for ok in NEUTRAL[key]):
                raise _invalid(key, NEUTRAL_MESSAGES.get(key, f"'{key}' is not supported by this server "
                                                              f"(accepted only as {NEUTRAL[key][0]!r})"))
            continue
        raise _invalid(key, f"Unrecognized request argument supplied: {key}", "unknown_parameter")


# ---------------------------------------------------------------------------------------- requests


@dataclass
class GenRequest:
    """A validated request: what the engine needs plus how to answer."""

    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    n: int = 1  # choices: n engine requests, the i-th seeded with seed + i when a seed is given


def _check_model(body: dict, model_name: str) -> str:
    name = body.get("model")
    if name is None:
        raise _invalid("model", "'model' is required", "missing_required_parameter")
    name = _text(name, "model")
    if name != model_name:
        raise ApiError(404, f"The model '{name}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    return name


def max_prompt_chars(tokenizer, n_ctx: int) -> int:
    """The most characters a prompt that fits in ``n_ctx`` tokens can have: ``n_ctx`` x the length of the
    vocabulary's longest token (its string: one character per byte for a byte-level BPE, at least the
    text's for SentencePiece), floored at `MIN_CHARS_PER_TOKEN`. A longer prompt is refused before it
    is tokenized: tokenizing a 15 MB prompt blocked the server for 21 s and took 1.6 GB (audit E30).
    (A tokenizer whose normalizer deletes characters could fit more; such prompts are refused too.)"""
    longest = max(map(len, tokenizer.get_vocab()), default=0)
    return n_ctx * max(longest, MIN_CHARS_PER_TOKEN)


def _check_prompt_chars(n_chars: int, max_chars: int, n_ctx: int, param: str) -> None:
    if n_chars > max_chars:
        raise ApiError(400, f"This model's maximum context length is {n_ctx} tokens, and the prompt has "
                            f"{n_chars} characters, more than {n_ctx} tokens can hold ({max_chars}).",
                       param=param, code="context_length_exceeded")


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives a request asks for per token, or None for no logprobs: completions take
    ``logprobs: N``; chat takes ``logprobs: true`` and ``top_logprobs: N`` (as OpenAI's API)."""
    if not chat:
        if body.get("logprobs") is False:
            return None
        return _int(body, "logprobs", 0, MAX_LOGPROBS)
    wanted = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not wanted:
        raise _invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return (top or 0) if wanted else None


def _build(body: dict, prompt_ids: list[int], n_ctx: int, default_max_tokens: int | None,
           model: str, chat: bool = False) -> GenRequest:
    if len(prompt_ids) >= n_ctx:
        raise ApiError(400, f"This model's maximum context length is {n_ctx} tokens, and the prompt has "
                            f"{len(prompt_ids)}; it must leave room for at least one new token.",
                       param="prompt" if "prompt" in body else "messages", code="context_length_exceeded")
    room = n_ctx - len(prompt_ids)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, name)
    if max_tokens is not None and max_tokens <= 0:
        raise _invalid(name, f"'{name}' must be >= 1, got {max_tokens}")
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    elif max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} "
                            f"for the completion).", param=name, code="context_length_exceeded")
    temperature = _float(body, "temperature", 0.0, 2.0)
    top_p = _float(body, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", lo=-1)
    seed = _int(body, "seed", lo=-(2**63), hi=2**64 - 1)
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _invalid("stream_options", "'stream_options' must be an object", "invalid_type")
    include_usage = bool(opts and _bool(opts, "include_usage"))
    n = _int(body, "n", 1, MAX_N) or 1
    try:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                                top_k=max(top_k or 0, 0), top_p=1.0 if top_p is None else top_p, stop=_stop(body),
                                seed=seed, ignore_eos=_bool(body, "ignore_eos"), logprobs=_logprobs(body, chat))
    except QuantkitError as e:
        raise _invalid("params", str(e)) from None
    return GenRequest(model, prompt_ids, params, stream, include_usage, n)


def parse_completion(body: dict, tokenizer, model_name: str, n_ctx: int, max_chars: int | None = None) -> GenRequest:
    """Validate a /v1/completions body. The prompt is a string or a list of token ids (one prompt); a
    string over ``max_chars`` characters (default `max_prompt_chars`) is refused before tokenizing."""
    max_chars = max_prompt_chars(tokenizer, n_ctx) if max_chars is None else max_chars
    model = _check_model(body, model_name)
    _unsupported(body, "completions")
    if "prompt" not in body:
        raise _invalid("prompt", "'prompt' is required", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        _check_prompt_chars(len(prompt), max_chars, n_ctx, "prompt")
        ids = encode_prompt(tokenizer, _text(prompt, "prompt"))
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise _invalid("prompt", f"token ids must be in [0, {vocab})")
        ids = list(prompt)
    else:
        raise _invalid("prompt", "'prompt' must be a string or a non-empty list of token ids (one prompt)")
    return _build(body, ids, n_ctx, DEFAULT_COMPLETION_MAX_TOKENS, model)


def _message_content(content, i: int) -> str:
    param = f"messages[{i}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return _text(content, param)
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _invalid(param, "only text content parts are supported")
            parts.append(_text(part.get("text"), param))
        return "".join(parts)
    raise _invalid(param, f"'{param}' must be a string or a list of text parts", "invalid_type")


def parse_chat(body: dict, tokenizer, model_name: str, n_ctx: int, max_chars: int | None = None) -> GenRequest:
    """Validate a /v1/chat/completions body; the prompt comes from the tokenizer's chat template. Messages
    over ``max_chars`` characters in all (default `max_prompt_chars`) are refused before templating."""
    max_chars = max_prompt_chars(tokenizer, n_ctx) if max_chars is None else max_chars
    model = _check_model(body, model_name)
    _unsupported(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "'messages' must be a non-empty list", "invalid_type")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _invalid(f"messages[{i}]", f"messages[{i}] must be an object with a string 'role'")
        clean.append({"role": _text(m["role"], f"messages[{i}].role"),
                      "content": _message_content(m.get("content"), i)})
    _check_prompt_chars(sum(len(m["role"]) + len(m["content"]) for m in clean), max_chars, n_ctx, "messages")
    try:
        ids = encode_chat(tokenizer, clean)
    except Exception as e:  # the template rejected the conversation (e.g. role order)
        raise _invalid("messages", f"the chat template rejected the messages: {e}") from None
    return _build(body, ids, n_ctx, None, model, chat=True)


# --------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries, offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object of generated tokens (`TokenLogprob`s); ``offset``:
    characters of the choice's text before the first."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{**{t: v for t, v, _ in e.top}, e.text: e.logprob} for e in entries], "text_offset": offsets}


def chat_logprobs(entries) -> dict:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}, ...]}``."""
    def item(text: str, logprob: float, raw) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**item(e.text, e.logprob, e.bytes), "top_logprobs": [item(*t) for t in e.top]} for e in entries]}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def completion_body(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_body(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     index: int = 0, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               index: int = 0, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
