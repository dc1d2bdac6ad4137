"""Per-token log-probabilities for the server's ``logprobs`` / ``top_logprobs`` (issue 21).

Each generated token of a request that asks for them gets a `TokenLogprob`: its log-probability
under the model's raw distribution (before temperature and filtering, as vLLM reports them:
`quantkit.runtime.generate.token_logprobs`), the top alternatives, and the text of each, read as
what the token adds after the few ids before it (a SentencePiece token decoded alone loses its
leading space).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.runtime.generate import token_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, log-probability and the top alternatives ``[(text, logprob), ...]``."""

    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


def token_entry(tokenizer, recent: list[int], logits: torch.Tensor, tok: int, top: int) -> TokenLogprob:
    """``tok``'s entry from its step's logits ``[V]``; ``recent``: the ids just before it."""
    lp, alternatives = token_logprobs(logits, tok, top)
    base = tokenizer.decode(recent, skip_special_tokens=False)

    def text(t: int) -> str:
        full = tokenizer.decode(recent + [t], skip_special_tokens=False)
        return full[len(base):] if full.startswith(base) else tokenizer.decode([t], skip_special_tokens=False)

    return TokenLogprob(tok, text(tok), lp, tuple((text(t), v) for t, v in alternatives))
