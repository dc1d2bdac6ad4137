"""Row operations on a batched KV cache, for continuous batching.

A running batch keeps one transformers `Cache` whose rows are left-padded to a common length (the
padding is masked out by the attention mask), and whose ``get_seq_length()`` counts that padding.
Sequences join by `concat_rows` after their own prefill and leave by `select_rows`; `drop_left`
removes columns that became padding for every row.

Each function works layer by layer. A layer that stores more than float keys and values (a quantized
KV layer: codes, scales, a float residual, a token count) moves its own rows by implementing all of

* ``batch_select(rows)``: keep the rows of a LongTensor of indices, in that order;
* ``batch_pad_left(n)``: insert n columns of padding in front of every row;
* ``batch_drop_left(n)``: remove the first n columns (padding in every row);
* ``batch_concat(other)``: append the rows of ``other``, a layer of the same kind and length,

keeping its ``get_seq_length()`` equal to the padded length after each (see
`quantkit.runtime.kvcache.QuantizedKVLayer`). Any other layer is a set of tensors shaped
[batch, heads, seq, ...], those named by its ``batch_tensors`` attribute, default ``("keys",
"values")`` (transformers' `DynamicLayer`, whose length is its tensors'): zero padding is fine
because padded columns are masked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SEQ_DIM = 2  # [batch, heads, seq, ...]


def _state_names(layer) -> tuple[str, ...]:
    return tuple(getattr(layer, "batch_tensors", ("keys", "values")))


def _map_state(layer, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for name in _state_names(layer):
        setattr(layer, name, fn(getattr(layer, name)))


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[SEQ_DIM] = n
    return torch.cat([t.new_zeros(shape), t], dim=SEQ_DIM)


def seq_length(cache) -> int:
    """Columns in the cache (padding included)."""
    return cache.get_seq_length()


def _each_layer(cache, method: str, arg, default: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Each layer's own ``method(arg)`` where it has one, else ``default`` on its state tensors."""
    for layer in cache.layers:
        own = getattr(layer, method, None)
        if own is not None:
            own(arg)
        else:
            _map_state(layer, default)


def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep the rows (a LongTensor of indices) of every layer, in that order."""
    _each_layer(cache, "batch_select", rows, lambda t: t.index_select(0, rows.to(t.device)))


def drop_left(cache, n: int) -> None:
    """Remove the first n columns (padding in every row)."""
    if n > 0:
        _each_layer(cache, "batch_drop_left", n, lambda t: t.narrow(SEQ_DIM, n, t.shape[SEQ_DIM] - n))


def pad_left(cache, n: int) -> None:
    """Insert n columns of padding (zeros) at the start of every row."""
    if n > 0:
        _each_layer(cache, "batch_pad_left", n, lambda t: _pad(t, n))


def concat_rows(cache, other) -> None:
    """Append the rows of ``other`` to ``cache``, left-padding whichever is shorter; ``other`` is consumed."""
    t_self, t_other = seq_length(cache), seq_length(other)
    pad_left(cache, t_other - t_self)
    pad_left(other, t_self - t_other)
    for layer, layer_o in zip(cache.layers, other.layers, strict=True):
        if hasattr(layer, "batch_concat"):
            layer.batch_concat(layer_o)
        else:
            for name in _state_names(layer):
                setattr(layer, name, torch.cat([getattr(layer, name), getattr(layer_o, name)], dim=0))
