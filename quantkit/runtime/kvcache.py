"""A quantized KV cache for transformers models: keys and values stored as int8 or int4.

Two layouts (``KVQuantConfig.keys``):

* ``"token"`` (default): keys and values quantized per token and KV head (one fp16 scale, plus a
  uint8 zero point when asymmetric, over ``head_dim``).  Every token is quantized as it is
  written and every read dequantizes the whole cache, the tokens just written included, so a
  forward over a window sees exactly what token-by-token decoding from this cache would see,
  whatever the chunking.
* ``"channel"`` (KIVI, Liu et al. 2024): keys quantized per channel over groups of ``group``
  tokens, values per token; the most recent tokens (fewer than ``group``) stay in float until
  their group is full, as in KIVI's residual.  Prefilling in chunks of ``group`` tokens
  reproduces token-by-token decoding exactly (:class:`KVCachedLM` does so).

A layer also moves its own rows for a continuously batched server (``batch_select``,
``batch_pad_left``, ``batch_drop_left``, ``batch_concat``; :mod:`quantkit.serve.kvbatch`), rows
left-padded to one length: a padded ``"token"`` layer holds zero codes and scales in the padding;
a ``"channel"`` layer keeps one batch-1 layer per row (see :meth:`QuantizedKVLayer.batch_pad_left`).

Codes use the shared grid of :mod:`quantkit.core.quant` (symmetric by default at 8 bits,
asymmetric at 4) and 4-bit codes are packed two per byte with :mod:`quantkit.pack.bits`.

    >>> cache = QuantizedKVCache.for_model(model, KVQuantConfig(bits=8))
    >>> out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    >>> kv_cache_bytes(cache) / cache.get_seq_length()      # bytes per token, all layers
    >>> perplexity(KVCachedLM(model, KVQuantConfig(bits=4)), windows)   # quantkit.eval.perplexity
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from quantkit.core.hadamard import HadamardTransform
from quantkit.core.rotation import ROTATED_ATTR
from quantkit.errors import QuantkitError
from quantkit.core.quant import QuantSpec, compute_qparams, quantize_codes
from quantkit.pack.bits import pack_bits, unpack_bits


@dataclass(frozen=True)
class KVQuantConfig:
    bits: int = 8  # 8 or 4
    keys: str = "token"  # "token": per token and head; "channel": per channel over groups of `group` tokens (KIVI)
    group: int = 64  # "channel": tokens per key group, also the float residual's capacity
    sym: bool | None = None  # None: symmetric at 8 bits, asymmetric at 4 bits
    rotate: bool = False  # "token": each head's keys through a Hadamard transform before quantizing, back when read

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise QuantkitError(f"KV-cache bits must be 8 or 4, got {self.bits}")
        if self.keys not in ("token", "channel"):
            raise QuantkitError(f"KV-cache key layout must be 'token' or 'channel', got {self.keys!r}")
        if self.group < 1:
            raise QuantkitError(f"KV-cache group must be positive, got {self.group}")
        if self.rotate and self.keys != "token":
            raise QuantkitError("a rotated KV cache quantizes per token: it does not combine with keys='channel' (KIVI)")

    @property
    def spec(self) -> QuantSpec:
        sym = self.bits == 8 if self.sym is None else self.sym
        return QuantSpec(self.bits, -1, sym)


# ---- quantized tensors ----------------------------------------------------------------------
def kv_config(bits: int, keys: str | None, model: nn.Module) -> KVQuantConfig:
    """The commands' KV cache (``--kv-bits``, ``--kv-keys``): ``keys`` "token", "channel" or
    "rotated" (per token after a Hadamard transform); None: "rotated" for a model rotated by
    quantkit (:mod:`quantkit.core.rotation`), else "token"."""
    if keys is None:
        keys = "rotated" if getattr(model, ROTATED_ATTR, None) is not None else "token"
    return KVQuantConfig(bits=bits, keys="token" if keys == "rotated" else keys, rotate=keys == "rotated")


@dataclass
class QTensor:
    """Codes packed along the last dim, ``[b, h, t, ceil(d * bits / 8)]`` uint8, with ``scale``
    (fp16) and ``zero`` (uint8, asymmetric only) broadcastable against ``[b, h, t, d]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    dim: int  # head_dim

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)

    def map(self, fn) -> "QTensor":
        return QTensor(fn(self.codes), fn(self.scale), None if self.zero is None else fn(self.zero), self.bits, self.dim)


def _quantize_rows(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``x [rows, n]`` on the shared grid: codes ``[rows, n]`` uint8, scale and zero ``[rows]``."""
    s, z = compute_qparams(x, spec)
    return quantize_codes(x, s.unsqueeze(1), z.unsqueeze(1), spec.maxq).to(torch.uint8), s, z


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    lead, d = codes.shape[:-1], codes.shape[-1]
    packed = pack_bits(codes.reshape(-1, d), bits)  # [rows, d] -> [rows, d * bits / 8]
    return packed.reshape(*lead, packed.shape[-1])  # explicit width: zero new tokens is a valid update


def _unpack(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    lead = packed.shape[:-1]
    return unpack_bits(packed.reshape(-1, packed.shape[-1]), bits, d).reshape(*lead, d)


def quantize_per_token(x: torch.Tensor, spec: QuantSpec) -> QTensor:
    """``x [b, h, t, d]``: one scale (and zero) per token and head, over ``d``."""
    b, h, t, d = x.shape
    q, s, z = _quantize_rows(x.reshape(-1, d).float(), spec)
    return QTensor(_pack(q.reshape(b, h, t, d), spec.bits), s.to(torch.float16).reshape(b, h, t, 1),
                   None if spec.sym else z.to(torch.uint8).reshape(b, h, t, 1), spec.bits, d)


def quantize_per_channel(x: torch.Tensor, spec: QuantSpec, group: int) -> QTensor:
    """``x [b, h, t, d]`` with ``t`` a multiple of ``group``: one scale (and zero) per channel and
    head for each group of ``group`` tokens; scales are ``[b, h, t / group, d]``."""
    b, h, t, d = x.shape
    n = t // group
    xg = x.float().reshape(b, h, n, group, d).transpose(-1, -2)  # [b, h, n, d, group]: rows run over tokens
    q, s, z = _quantize_rows(xg.reshape(-1, group), spec)
    q = q.reshape(b, h, n, d, group).transpose(-1, -2).reshape(b, h, t, d)
    return QTensor(_pack(q, spec.bits), s.to(torch.float16).reshape(b, h, n, d),
                   None if spec.sym else z.to(torch.uint8).reshape(b, h, n, d), spec.bits, d)


def dequantize_kv(qt: QTensor, group: int | None = None) -> torch.Tensor:
    """Float32 ``[b, h, t, d]``; ``group`` for per-channel tensors (scales per group of tokens)."""
    q = _unpack(qt.codes, qt.bits, qt.dim).float()
    zero = qt.zero.float() if qt.zero is not None else torch.tensor(float(2 ** (qt.bits - 1)), device=q.device)
    if group is None:
        return (q - zero) * qt.scale.float()
    if zero.dim():
        zero = zero.repeat_interleave(group, dim=2)
    return (q - zero) * qt.scale.float().repeat_interleave(group, dim=2)


def _cat(a: QTensor | None, b: QTensor, dim: int = 2) -> QTensor:
    """``a`` then ``b`` along the tokens (``dim=2``) or the batch (``dim=0``)."""
    if a is None:
        return b
    return QTensor(torch.cat([a.codes, b.codes], dim=dim), torch.cat([a.scale, b.scale], dim=dim),
                   None if a.zero is None else torch.cat([a.zero, b.zero], dim=dim), a.bits, a.dim)


def _pad_tokens_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t [b, h, tokens, ...]`` with ``n`` zero tokens in front (zero codes and scales read back as 0)."""
    return torch.cat([t.new_zeros(*t.shape[:2], n, *t.shape[3:]), t], dim=2)


# ---- the cache --------------------------------------------------------------------------------
class QuantizedKVLayer(DynamicLayer):
    """One attention layer's quantized keys and values (``self.keys``/``self.values`` hold only
    the float residual of the ``"channel"`` layout; they are empty in the ``"token"`` layout)."""

    is_croppable = False

    def __init__(self, config: KVQuantConfig):
        super().__init__()
        self.config = config
        self.cumulative_length = 0
        self._qkeys: QTensor | None = None
        self._qvalues: QTensor | None = None
        self._rows: list[QuantizedKVLayer] | None = None  # a batched "channel" layer: one layer per row

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype  # what reads return; transformers' DynamicLayer stopped setting it in 5.25
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty(b, h, 0, d)  # not a view: it would keep the first states alive
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.config.group if self.config.keys == "channel" else None
        k = dequantize_kv(self._qkeys, group) if self._qkeys is not None else self.keys[..., :0, :]
        v = dequantize_kv(self._qvalues) if self._qvalues is not None else self.values[..., :0, :]
        if self.config.rotate:
            k = self._turn(k, inverse=True)
        return k.to(self.dtype), v.to(self.dtype)

    def _turn(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:  # the rotated layout's transform (or back)
        return HadamardTransform(x.shape[-1])(x.float(), inverse=inverse) if x.shape[-2] else x

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is not None:
            return self._update_rows(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        spec = self.config.spec
        if self.config.keys == "token":  # quantize on write, read everything back from the cache
            if self.config.rotate:  # keys only: a rotated model's values are rotated per head offline (v_proj)
                key_states = self._turn(key_states)
            self._qkeys = _cat(self._qkeys, quantize_per_token(key_states, spec))
            self._qvalues = _cat(self._qvalues, quantize_per_token(value_states, spec))
            return self._dequantized()
        # KIVI: the residual stays float until a whole group of tokens can be quantized per channel
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        k, v = self._dequantized()
        keys, values = torch.cat([k, self.keys], dim=-2), torch.cat([v, self.values], dim=-2)
        full = self.keys.shape[-2] // self.config.group * self.config.group
        if full:
            self._qkeys = _cat(self._qkeys, quantize_per_channel(self.keys[..., :full, :], spec, self.config.group))
            self._qvalues = _cat(self._qvalues, quantize_per_token(self.values[..., :full, :], spec))
            self.keys, self.values = self.keys[..., full:, :], self.values[..., full:, :]
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length  # columns, the left padding of a batch included

    def nbytes(self) -> int:
        """Bytes held: codes, scales, zero points and the float residual."""
        if self._rows is not None:
            return sum(row.nbytes() for row in self._rows)
        total = sum(q.nbytes() for q in (self._qkeys, self._qvalues) if q is not None)
        if self.is_initialized:
            total += self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return total

    def reset(self) -> None:
        self._qkeys = self._qvalues = self._rows = None
        self.cumulative_length = 0
        super().reset()

    def _map(self, fn) -> None:
        """Apply ``fn`` (a batch-dim operation) to everything stored."""
        if not self.is_initialized:
            return
        self._qkeys = self._qkeys.map(fn) if self._qkeys is not None else None
        self._qvalues = self._qvalues.map(fn) if self._qvalues is not None else None
        self.keys, self.values = fn(self.keys), fn(self.values)

    def _batch_size(self) -> int:
        return len(self._rows) if self._rows is not None else self.keys.shape[0] if self.is_initialized else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.batch_select(torch.arange(self._batch_size())[torch.as_tensor(indices).cpu()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select(torch.arange(self._batch_size()).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped (quantkit)")

    # ---- row operations of a continuously batched cache (quantkit.serve.kvbatch) ----------------
    def batch_select(self, rows: torch.Tensor) -> None:
        """Keep the rows ``rows`` (indices, in that order, repeats allowed)."""
        if self._rows is not None:
            self._rows = [copy.copy(self._rows[i]) for i in rows.tolist()]  # updates replace tensors: copies are apart
        else:
            self._map(lambda t: t.index_select(0, rows.to(t.device)))

    def batch_pad_left(self, n: int) -> None:
        """Insert ``n`` columns of padding in front of every row (the attention mask hides them).

        ``"token"``: zero codes and scales (they read back as 0).  ``"channel"``: a row's key groups
        start at its first token and its float residual holds its last ``length % group`` tokens, so
        rows of different lengths share neither group boundaries nor a residual, and padding a group
        would change its scales: the layer splits into one batch-1 layer per row, each updated as it
        would be alone, whose reads are left-padded to the batch's length."""
        if n <= 0:
            return
        if self.config.keys == "channel":
            self._split_rows()
        elif self._qkeys is not None:
            self._qkeys = self._qkeys.map(lambda t: _pad_tokens_left(t, n))
            self._qvalues = self._qvalues.map(lambda t: _pad_tokens_left(t, n))
        self.cumulative_length += n

    def batch_drop_left(self, n: int) -> None:
        """Remove the first ``n`` columns (padding in every row)."""
        if n <= 0:
            return
        if self.config.keys == "channel":
            longest = max((row.cumulative_length for row in self._split_rows()), default=0)
            if self.cumulative_length - n < longest:
                raise ValueError(f"dropping {n} columns would drop cached tokens of a row")
        elif self._qkeys is not None:
            self._qkeys = self._qkeys.map(lambda t: t[:, :, n:])
            self._qvalues = self._qvalues.map(lambda t: t[:, :, n:])
        self.cumulative_length -= n

    def batch_concat(self, other: "QuantizedKVLayer") -> None:
        """Append the rows of ``other`` (same config and length; it must not be used afterwards)."""
        if not (self.is_initialized and other.is_initialized):
            raise ValueError("an empty KV layer has no rows to join")
        if other.config != self.config or other.cumulative_length != self.cumulative_length:
            raise ValueError(f"cannot join KV layers of {other.config} x {other.cumulative_length} tokens "
                             f"to {self.config} x {self.cumulative_length} tokens")
        if self.config.keys == "channel":
            self._rows = self._split_rows() + other._split_rows()
            return
        self._qkeys, self._qvalues = _cat(self._qkeys, other._qkeys, dim=0), _cat(self._qvalues, other._qvalues, dim=0)
        self.keys, self.values = torch.cat([self.keys, other.keys]), torch.cat([self.values, other.values])

    def _split_rows(self) -> list["QuantizedKVLayer"]:
        """This layer as one batch-1 layer per row (once; a batched layer has no padding yet)."""
        if self._rows is None:
            rows = []
            for b in range(self._batch_size()):
                rows.append(copy.copy(self))
                rows[-1]._map(lambda t, b=b: t[b:b + 1].clone())  # not a view: it would keep the whole batch alive
            self._rows, self._qkeys, self._qvalues = rows, None, None
            self.keys, self.values = self.keys.new_empty(0), self.values.new_empty(0)  # held by the rows now
        return self._rows

    def _update_rows(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batched ``"channel"`` layer: each row updates its own layer; reads are left-padded to the batch."""
        self.cumulative_length += key_states.shape[-2]
        t = self.cumulative_length
        reads = [row.update(key_states[b:b + 1], value_states[b:b + 1]) for b, row in enumerate(self._rows)]
        keys, values = (torch.cat([F.pad(x, (0, 0, t - x.shape[-2], 0)) for x in xs]) for xs in zip(*reads))
        return keys, values


class QuantizedKVCache(Cache):
    """A :class:`transformers.Cache` of :class:`QuantizedKVLayer`, one per decoder layer."""

    def __init__(self, config: KVQuantConfig, num_layers: int):
        self.kv_config = config
        super().__init__(layers=[QuantizedKVLayer(config) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model: nn.Module, config: KVQuantConfig) -> "QuantizedKVCache":
        text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        types = getattr(text, "layer_types", None) or []
        other = sorted(set(types) - {"full_attention"})
        if other:
            raise QuantkitError(f"the quantized KV cache supports full-attention layers only; this model has {', '.join(other)}")
        return cls(config, text.num_hidden_layers)


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes a cache holds (quantized: codes, scales, zeros, residual; float: keys and values)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def kv_bytes_per_token(model_config, kv: KVQuantConfig | None, float_bytes: int = 2) -> float:
    """Bytes per token of context over all layers, in the long-context limit (residual ignored).

    ``kv=None``: a float cache of ``float_bytes`` per element (2 for fp16/bf16, 4 for fp32)."""
    text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    d = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_head = 2 * d * float_bytes  # keys and values
    if kv is not None:
        codes = (d * kv.bits + 7) // 8
        meta = 2 + (0 if kv.spec.sym else 1)  # fp16 scale (+ uint8 zero)
        key_meta = meta * d / kv.group if kv.keys == "channel" else meta
        per_head = 2 * codes + meta + key_meta
    return per_head * heads * text.num_hidden_layers


class KVCachedLM(nn.Module):
    """A causal LM whose forward goes through a (quantized) KV cache, for perplexity.

    Each call makes a fresh cache and prefills ``input_ids`` in chunks (default: the whole
    window for the ``"token"`` layout, ``group`` tokens for ``"channel"``; see the module doc for
    why each reproduces token-by-token decoding).  ``kv=None`` uses a float ``DynamicCache``.
    The last call's cache is kept in ``last_cache`` (for measuring its bytes)."""

    def __init__(self, model: nn.Module, kv: KVQuantConfig | None, chunk: int | None = None):
        super().__init__()
        self.model, self.kv, self.chunk = model, kv, chunk
        self.config = model.config
        self.last_cache: Cache | None = None

    def new_cache(self) -> Cache:
        return DynamicCache() if self.kv is None else QuantizedKVCache.for_model(self.model, self.kv)

    def forward(self, input_ids: torch.Tensor, **_ignored) -> SimpleNamespace:
        cache = self.new_cache()
        t = input_ids.shape[1]
        step = self.chunk or (self.kv.group if self.kv is not None and self.kv.keys == "channel" else t)
        logits = []
        for s in range(0, t, step):
            out = self.model(input_ids=input_ids[:, s:s + step], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        self.last_cache = cache
        return SimpleNamespace(logits=torch.cat(logits, dim=1), past_key_values=cache)
