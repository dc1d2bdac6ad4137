"""Row operations on a batched KV cache, for continuous batching.

A running batch keeps one transformers `Cache` whose tensors are [batch, heads, seq, ...], rows
left-padded to a common length (the padding is masked out by the attention mask). Sequences join by
`concat_rows` after their own prefill and leave by `select_rows`; `drop_left` removes columns that
became padding for every row.

The state tensors of a cache layer are those named by its ``batch_tensors`` attribute, default
``("keys", "values")`` (transformers' `DynamicLayer`). A quantized KV layer declares its own, e.g.
``batch_tensors = ("qkeys", "kscales", "qvalues", "vscales")``, each shaped [batch, heads, seq, ...],
and works here unchanged: zero padding is fine because padded columns are masked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SEQ_DIM = 2  # [batch, heads, seq, ...]


def _state_names(layer) -> tuple[str, ...]:
    return tuple(getattr(layer, "batch_tensors", ("keys", "values")))


def _map_state(cache, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for layer in cache.layers:
        for name in _state_names(layer):
            setattr(layer, name, fn(getattr(layer, name)))


def seq_length(cache) -> int:
    """Columns in the cache (padding included)."""
    return cache.get_seq_length()


def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep the rows (a LongTensor of indices) of every state tensor, in that order."""
    _map_state(cache, lambda t: t.index_select(0, rows))


def drop_left(cache, n: int) -> None:
    """Remove the first n columns (padding in every row)."""
    if n > 0:
        _map_state(cache, lambda t: t.narrow(SEQ_DIM, n, t.shape[SEQ_DIM] - n))


def pad_left(cache, n: int) -> None:
    """Insert n zero columns at the start of every row."""
    if n > 0:

        def pad(t: torch.Tensor) -> torch.Tensor:
            shape = list(t.shape)
            shape[SEQ_DIM] = n
            return torch.cat([t.new_zeros(shape), t], dim=SEQ_DIM)

        _map_state(cache, pad)


def concat_rows(cache, other) -> None:
    """Append the rows of ``other`` to ``cache``, left-padding whichever is shorter; ``other`` is consumed."""
    t_self, t_other = seq_length(cache), seq_length(other)
    pad_left(cache, t_other - t_self)
    pad_left(other, t_self - t_other)
    for layer, layer_o in zip(cache.layers, other.layers, strict=True):
        for name in _state_names(layer):
            setattr(layer, name, torch.cat([getattr(layer, name), getattr(layer_o, name)], dim=0))
