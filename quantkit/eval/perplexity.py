"""Perplexity under the GPTQ protocol: the whole split tokenized once, non-overlapping windows
of ``seqlen`` tokens, ``exp(mean NLL)`` over every predicted token (``seqlen - 1`` per window).

The standard error is that of the mean token NLL, carried to perplexity (``ppl * se``), as
llama-perplexity reports it.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from quantkit.errors import QuantkitError


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1,
               progress: Callable[[int, int, float], None] | None = None) -> dict:
    """``windows [n, seqlen]`` token ids -> ``{"perplexity", "stderr", "tokens", "windows", "seqlen", "seconds"}``."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    n, seqlen = windows.shape
    nll_sum, nll_sq, count = 0.0, 0.0, 0
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # [b, seq, vocab]
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="none").double()
        nll_sum += float(nll.sum())
        nll_sq += float(nll.pow(2).sum())
        count += nll.numel()
        ppl = finite_perplexity(nll_sum / count)  # a NaN stops the run here, not after the last window
        if progress is not None:
            progress(min(start + batch_size, n), n, ppl)
    mean = nll_sum / count
    var = max(nll_sq / count - mean * mean, 0.0)
    return {
        "perplexity": ppl,
        "stderr": ppl * math.sqrt(var / count),
        "tokens": count,
        "windows": n,
        "seqlen": seqlen,
        "seconds": time.perf_counter() - t0,
    }


def finite_perplexity(mean_nll: float, who: str = "") -> float:
    """``exp(mean_nll)``, refused when it is not finite: a NaN/Inf perplexity is never a result
    (and ``NaN`` is not JSON).  ``who`` (a model's name) starts the message."""
    ppl = math.exp(mean_nll) if mean_nll < 709.0 else math.inf  # math.exp overflows past ~709.78; NaN < x is False
    if not math.isfinite(ppl):
        raise QuantkitError(f"{who + ': ' if who else ''}perplexity is not finite ({'NaN' if math.isnan(mean_nll) else 'Inf'}): "
                            "the model computes NaN/Inf logits on this data")
    return ppl
