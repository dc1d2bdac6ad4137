"""The running batch of the serving engine: sequences of their own lengths decoded one token a step.

Two forms, one interface (`join`, `step`, `keep`, `clear`), rows in the engine's order of its
active sequences:

* `LeanBatch`: quantkit's lean forward (`quantkit.runtime.lean.LeanLM`, what ``quantkit generate``
  runs) with one static cache row per sequence; each row decodes at its own position, so nothing is
  padded, and a lone sequence takes the same step as ``generate`` (on a float32 int4 checkpoint with
  the native kernels, the one-call native decode step; a bf16 one stays on the torch ops, which is
  what its batched rows compute). The cache grows (rows, and columns by doubling)
  as sequences join and lengthen.
* `PaddedBatch`: transformers' forward over one `Cache` whose rows are left-padded to a common
  length (`quantkit.serve.kvbatch`); for models without a lean forward and for quantized KV caches.

`batch_for` picks the lean one where it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from quantkit.runtime.generate import CacheFactory, context_length, make_cache, model_device
from quantkit.runtime.lean import LeanLM, LeanUnsupported
from quantkit.serve import kvbatch

log = logging.getLogger("quantkit.serve")

INITIAL_COLUMNS = 256  # the lean cache's first allocation per row; it doubles as sequences grow


class LeanBatch:
    """Rows of a `LeanLM`'s cache, one per active sequence."""

    kind = "lean"

    def __init__(self, lean):
        self.lean = lean
        self.device = lean.device
        self.rows = 0

    def prefill(self, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, object]:
        """Run a newcomer's prompt on its own: its next-token logits ``[V]`` float32, and what `add`
        takes to join it to the batch. A failure here leaves the running rows as they were."""
        ids = torch.tensor([list(prompt_ids)], device=self.device)
        return self.lean.prefill_row(self.rows, ids)[0], None  # written into the first free row

    def add(self, pending: object) -> None:
        """Join the prefilled newcomer as the last row."""
        self.rows += 1

    def step(self, last: Sequence[int], cached: Sequence[int]) -> torch.Tensor:
        """Row r continues with token ``last[r]`` at position ``cached[r]``: logits ``[B, V]``."""
        ids = torch.tensor([[t] for t in last], device=self.device)
        return self.lean.step_rows(ids, torch.tensor(list(cached), device=self.device))

    def keep(self, rows: Sequence[int], cached: Sequence[int]) -> None:
        """Keep rows ``rows`` in that order (``cached``: each running row's filled positions)."""
        self.lean.keep_rows(list(rows), max(cached[r] for r in rows) if rows else 0)
        self.rows = len(rows)

    def clear(self) -> None:
        self.rows = 0


class PaddedBatch:
    """transformers' forward over one KV cache whose rows are left-padded to a common length."""

    kind = "transformers"

    def __init__(self, model, cache_factory: CacheFactory | None = None):
        self.model = model
        self.device = model_device(model)
        self._factory = cache_factory
        self._kv = None

    def prefill(self, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, object]:
        kv = make_cache(self.model, self._factory)
        ids = torch.tensor([list(prompt_ids)], device=self.device)  # [1, L]
        return self.model(ids, past_key_values=kv, use_cache=True, logits_to_keep=1).logits[0, -1].float(), kv

    def add(self, kv) -> None:
        if self._kv is None:
            self._kv = kv
        else:
            kvbatch.concat_rows(self._kv, kv)

    def step(self, last: Sequence[int], cached: Sequence[int]) -> torch.Tensor:
        T = kvbatch.seq_length(self._kv)
        cached_t = torch.tensor(list(cached), device=self.device)  # [B]
        pad = T - cached_t  # [B] left padding of each row
        mask = (torch.arange(T + 1, device=self.device)[None, :] >= pad[:, None]).long()  # [B, T+1]
        input_ids = torch.tensor([[t] for t in last], device=self.device)  # [B, 1]
        out = self.model(input_ids, attention_mask=mask, position_ids=cached_t[:, None], past_key_values=self._kv,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def keep(self, rows: Sequence[int], cached: Sequence[int]) -> None:
        if not rows:
            self._kv = None
            return
        kvbatch.select_rows(self._kv, torch.tensor(list(rows)))
        T = kvbatch.seq_length(self._kv)
        kvbatch.drop_left(self._kv, T - max(cached[r] for r in rows))

    def clear(self) -> None:
        self._kv = None


def batch_for(model, cache_factory: CacheFactory | None = None, lean: bool = True,
              n_ctx: int | None = None) -> LeanBatch | PaddedBatch:
    """A `LeanBatch` when ``lean`` and the model has a lean forward and no quantized KV cache was asked
    for; else a `PaddedBatch` (the reason logged)."""
    if lean and cache_factory is None:
        n_ctx = n_ctx or context_length(model)
        try:
            lm = LeanLM(model, max_len=n_ctx, batch=1, capacity=min(INITIAL_COLUMNS, n_ctx))
            # the native step (and bf16 head) keep a float32 stream a bf16 batch's torch ops round at every
            # op: a lone row of a bf16 model takes the torch ops too, so batching never changes its text
            lm.set_native(lm.dtype == torch.float32)
            return LeanBatch(lm)
        except LeanUnsupported as e:
            log.info("serving with transformers' forward: %s", e)
    return PaddedBatch(model, cache_factory)
