"""Per-token log-probabilities for the server's ``logprobs`` / ``top_logprobs`` (issue 21).

Each generated token of a request that asks for them gets a `TokenLogprob`: its log-probability
under the model's raw distribution (before temperature and filtering, as vLLM reports them:
`quantkit.runtime.generate.token_logprobs`), the top alternatives, and the text of each, read as
what the token adds after the few ids before it (a SentencePiece token decoded alone loses its
leading space), and its bytes: the token's own bytes where its piece names them (a byte-fallback
``<0xE2>``, or a byte-level BPE piece, whose characters stand for bytes), else its text's UTF-8, so
a token holding part of a character reports that part, not U+FFFD.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import torch

from quantkit.runtime.generate import token_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, log-probability, bytes and the top alternatives
    ``[(text, logprob, bytes), ...]``."""

    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()
    bytes: tuple[int, ...] = ()


@cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (transformers' own table, inverted)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer, token_id: int, text: str) -> tuple[int, ...]:
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
            return (int(m.group(1), 16),)
        decoder = _byte_level_decoder()
        if piece and all(c in decoder for c in piece) and getattr(tokenizer, "is_fast", False) and \
                type(getattr(tokenizer.backend_tokenizer, "decoder", None)).__name__ == "ByteLevel":
            return tuple(decoder[c] for c in piece)
    return tuple(text.encode("utf-8"))


def token_entry(tokenizer, recent: list[int], logits: torch.Tensor, tok: int, top: int) -> TokenLogprob:
    """``tok``'s entry from its step's logits ``[V]``; ``recent``: the ids just before it."""
    lp, alternatives = token_logprobs(logits, tok, top)
    base = tokenizer.decode(recent, skip_special_tokens=False)

    def text(t: int) -> str:
        full = tokenizer.decode(recent + [t], skip_special_tokens=False)
        return full[len(base):] if full.startswith(base) else tokenizer.decode([t], skip_special_tokens=False)

    def item(t: int, v: float) -> tuple[str, float, tuple[int, ...]]:
        s = text(t)
        return s, v, token_bytes(tokenizer, t, s)

    own = item(tok, lp)
    return TokenLogprob(tok, own[0], lp, tuple(item(t, v) for t, v in alternatives), own[2])
