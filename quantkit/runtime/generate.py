"""Text generation for causal LMs: KV cache, greedy/temperature/top-k/top-p sampling, stop strings, streaming.

Plain functions over a transformers causal LM (anything whose forward takes
``input_ids, attention_mask, position_ids, past_key_values, use_cache`` and returns ``.logits`` and
``.past_key_values``). The server (`quantkit.serve`) reuses the same pieces: `SamplingParams`,
`sample_next`, `TextStream`, `eos_token_ids`, `encode_prompt`, `encode_chat`. The ``quantkit generate``
command lives in `quantkit.cli.serve` so that the CLI starts without importing torch.

    >>> model, tok = quantkit.checkpoint.formats.load_model("tests/fixtures/stories260K")
    >>> generate(model, tok, encode_prompt(tok, "Once upon"), SamplingParams(max_new_tokens=10)).text
    ' a time, there was a little girl'

The KV cache is a transformers `Cache`. Pass ``cache=`` either a fresh cache object or a factory
``model -> Cache`` (e.g. a quantized int8/int4 KV cache); the default is a float `DynamicCache`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError

CacheFactory = Callable[[torch.nn.Module], object]  # model -> transformers Cache

# A temperature below this is greedy. Sampling at 1e-5 already picks the argmax unless two logits lie
# within ~1e-4 of each other, and dividing by a smaller one is where float32 logits overflowed to inf
# (a 1e-300 temperature made the probabilities NaN and multinomial raise).
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # top alternatives reported per token at most (vLLM's and OpenAI's chat bound)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. A temperature below `GREEDY_TEMPERATURE` (0 included) is greedy; ``top_k == 0`` and
    ``top_p == 1`` are off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_new_tokens < 1:
            raise QuantkitError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise QuantkitError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise QuantkitError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise QuantkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise QuantkitError("stop strings must be non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise QuantkitError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


@dataclass
class Generation:
    """The result of `generate`: text (stop string excluded), ids and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


# --------------------------------------------------------------------------------------------- sampling


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on logits [..., V]; dropped entries become -inf.

    Works in float64 on logits shifted so that each row's maximum is 0, with the temperature floored at
    `GREEDY_TEMPERATURE`: any finite input gives finite kept entries (the maximum stays 0, the rest are
    <= 0 or -inf), so the softmax of the result is a valid distribution.
    """
    logits = logits.double()
    logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, GREEDY_TEMPERATURE)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens strictly more likely already reach top_p; the first is always kept
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick the next token id from one row of logits [V]. Raises `QuantkitError` (instead of sampling
    garbage) when the logits hold a NaN or +inf, or are all -inf: a model failure, not a request's."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.cpu()  # the generator is a CPU one (make_generator): a GPU's logits are sampled here
    if not torch.isfinite(logits.max()):  # max() is NaN when any entry is
        raise QuantkitError("cannot sample: the model's logits are NaN or infinite")
    probs = filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(-1)  # float64
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under the model's distribution (the raw logits [V], before
    temperature and filtering, as vLLM reports them) and the ``top`` most likely tokens with theirs."""
    lp = torch.log_softmax(logits.float(), -1)
    alternatives = []
    if top > 0:
        values, ids = torch.topk(lp, min(top, lp.shape[-1]))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return float(lp[token]), alternatives


def make_generator(seed: int | None) -> torch.Generator:
    """A per-sequence CPU generator: seeded sampling does not depend on what else is running."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


# ------------------------------------------------------------------------------------------ tokens/text


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """EOS ids from the tokenizer and the model's generation config (which may list several)."""
    ids: set[int] = set()
    candidates = [tokenizer.eos_token_id]
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        candidates.append(gen_cfg.eos_token_id)
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(i) for i in c)
    return frozenset(ids)


def context_length(model) -> int:
    """The longest sequence (prompt + completion) the model takes."""
    cfg = model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not n:
        raise QuantkitError("the model config gives no context length (max_position_embeddings)")
    return int(n)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a plain completion prompt, with the tokenizer's special tokens (e.g. BOS)."""
    ids = list(tokenizer(prompt).input_ids)
    if not ids:  # a tokenizer without BOS and an empty prompt: start from EOS like GPT-2 does
        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return ids


def _plain_chat_prompt(messages: Sequence[dict]) -> str:
    """Fallback for tokenizers without a chat template: 'Role: content' lines, then 'Assistant:'."""
    lines = [f"{str(m['role']).capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def encode_chat(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids for a chat, through the tokenizer's chat template when it has one.

    >>> encode_chat(tok, [{"role": "user", "content": "Hi"}])
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return encode_prompt(tokenizer, _plain_chat_prompt(messages))


class TextStream:
    """Turns generated token ids into text deltas: only complete UTF-8 text, stop strings cut out.

    A byte-fallback tokenizer can split one character over several tokens; their partial decode ends
    in U+FFFD, so text is released only once it decodes cleanly. A few prompt tokens are decoded
    alongside so that the first token keeps its leading space. Text that could be the start of a
    stop string is held back until it is known not to be one.
    """

    PROMPT_CONTEXT = 5

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self._tok = tokenizer
        self._ids = list(prompt_ids[-self.PROMPT_CONTEXT :])
        self._prefix = 0  # ids[prefix:read] decode to text already taken
        self._read = len(self._ids)
        self._stop = tuple(stop)
        self.text = ""  # complete text so far (cut at the stop string once one is found)
        self._emitted = 0  # characters of self.text handed out
        self.stopped = False  # a stop string was found

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly '')."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release()

    def _release(self) -> str:
        end = len(self.text)
        if self._stop:
            hits = [i for i in (self.text.find(s, self._emitted) for s in self._stop) if i >= 0]
            if hits:
                end = min(hits)
                self.text = self.text[:end]
                self.stopped = True
            else:  # hold back the longest tail that begins some stop string
                hold = 0
                for s in self._stop:
                    for k in range(min(len(s) - 1, end - self._emitted), hold, -1):
                        if self.text.endswith(s[:k]):
                            hold = k
                            break
                end -= hold
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def flush(self) -> str:
        """At the end of generation: the held-back text (an unfinished stop-string prefix is just text)."""
        out = self.text[self._emitted :]
        self._emitted = len(self.text)
        return out


# ------------------------------------------------------------------------------------------ decode loop


def model_device(model) -> torch.device:
    """Where ``model`` computes (its input embeddings' device; the CPU for a model without them):
    token ids are made there."""
    get = getattr(model, "get_input_embeddings", None)
    weight = getattr(get(), "weight", None) if callable(get) else None
    return weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")


def make_cache(model, cache: object | CacheFactory | None = None):
    """A KV cache for one generation: ``cache`` if it is a transformers `Cache`, else ``cache(model)``
    (a factory, e.g. ``lambda m: QuantizedKV(config=m.config)``), or by default a float `DynamicCache`."""
    from transformers import Cache, DynamicCache

    if cache is None:
        return DynamicCache(config=model.config)
    if isinstance(cache, Cache):
        return cache
    return cache(model)


def _next_logits(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Run the model on input_ids [1, T] with the cache; logits of the last position, [V] float32."""
    out = model(input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float()


def _stepper(model, prompt_len: int, params, cache, lean: bool, n_ctx: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``ids [1, T] -> logits [V]`` continuing one sequence: quantkit's lean forward when the model
    has one and no cache was asked for (:mod:`quantkit.runtime.lean`), else transformers' with ``cache``."""
    if lean and cache is None:
        from quantkit.runtime.cudagraph import decode_stepper
        from quantkit.runtime.lean import lean_or_none

        fast, _ = lean_or_none(model, min(n_ctx, prompt_len + params.max_new_tokens + 1))
        if fast is not None:
            step = decode_stepper(fast)  # on a GPU: single-token steps replay a CUDA graph
            return lambda ids: step(ids)[0]
    kv = make_cache(model, cache)
    return lambda ids: _next_logits(model, ids, kv)


def _token_steps(model, tokenizer, prompt_ids, params, cache, lean: bool = True) -> Iterator[tuple[int | None, str, str | None]]:
    """Yield (token_id, text_delta, finish_reason or None) per generated token; the last has a reason."""
    n_ctx = context_length(model)
    if not prompt_ids:
        raise QuantkitError("the prompt has no tokens")
    if len(prompt_ids) >= n_ctx:
        raise QuantkitError(f"prompt has {len(prompt_ids)} tokens; the model's context is {n_ctx}")
    eos = frozenset() if params.ignore_eos else eos_token_ids(model, tokenizer)
    stream = TextStream(tokenizer, prompt_ids, params.stop)
    gen = None if params.greedy else make_generator(params.seed)
    advance = _stepper(model, len(prompt_ids), params, cache, lean, n_ctx)
    n_tokens = len(prompt_ids)
    device = model_device(model)
    with torch.inference_mode():
        logits = advance(torch.tensor([list(prompt_ids)], device=device))
        for step in range(params.max_new_tokens):
            tok = sample_next(logits, params, gen)
            if tok in eos:
                yield None, stream.flush(), "stop"
                return
            delta = stream.push(tok)
            n_tokens += 1
            if stream.stopped:
                yield tok, delta, "stop"
                return
            if step == params.max_new_tokens - 1 or n_tokens >= n_ctx:
                yield tok, delta + stream.flush(), "length"
                return
            yield tok, delta, None
            logits = advance(torch.tensor([[tok]], device=device))


def stream_generate(model, tokenizer, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(),
                    cache=None, lean: bool = True) -> Iterator[str]:
    """Generate from token ids, yielding text deltas as soon as they are complete text.

    >>> for piece in stream_generate(model, tok, encode_prompt(tok, "Once"), SamplingParams(max_new_tokens=20)):
    ...     print(piece, end="", flush=True)
    """
    for _, delta, _ in _token_steps(model, tokenizer, prompt_ids, params, cache, lean):
        if delta:
            yield delta


def generate(model, tokenizer, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(),
             cache=None, lean: bool = True) -> Generation:
    """Generate from token ids; the text equals the concatenation of `stream_generate`'s deltas.
    ``lean``: use quantkit's lean forward when the model has one and ``cache`` is None."""
    t0 = time.perf_counter()
    pieces, ids, reason = [], [], "length"
    for tok, delta, finish in _token_steps(model, tokenizer, prompt_ids, params, cache, lean):
        pieces.append(delta)
        if tok is not None:
            ids.append(tok)
        reason = finish or reason
    return Generation("".join(pieces), ids, reason, len(prompt_ids), time.perf_counter() - t0)
