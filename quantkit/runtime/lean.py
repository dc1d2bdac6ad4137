"""A lean forward for Llama-style decoders: what a decode step costs beyond its weights.

On a CPU a decode step of a small model is dominated by the modelling code, not by the weights:
transformers' Llama forward runs ~60 small ATen ops per layer (mask building, cache bookkeeping,
RoPE as seven ops per tensor, attention over the whole static cache) plus a dozen Python module
calls, 5-30 us each once the weights stream through the caches.  :class:`LeanLM` runs the same
arithmetic with about half the ops and no per-step bookkeeping:

* RoPE tables for every position are computed once by the model's own rotary module (so any
  static ``rope_type``: default, linear, llama3, yarn), and applied as ``x*cos + roll(x)*sin'``
  (``sin'`` carries rotate_half's sign, so the products are the same numbers as transformers');
* its own static KV cache, written in place; attention reads only the filled prefix
  (``scaled_dot_product_attention``, grouped-query heads without copies);
* the linears are the model's own modules (float, ``QuantLinear``, ``Int8Linear``...), so every
  kernel path of the runtime applies; the head runs on the last position only.

Which models: the architecture table's :class:`~quantkit.models.arch.DecodeSpec` (Llama, Mistral,
Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3), with what differs by family as data (Gemma's ``(1 + w)``
norms, sandwich norms around attention and MLP, the block's own activation) or read from the config
(per-layer sliding windows, attention and logit soft-caps, Gemma 3's RoPE table per layer type:
:mod:`quantkit.runtime.lean_ops`); a RoPE that depends on the sequence length is refused.
:func:`lean_or_none` says why a model is not supported.  Tested against transformers' forward on
tiny models of each type (logits to float rounding).

    >>> lm = LeanLM(model, max_len=256)
    >>> logits = lm.forward(prompt_ids)        # [batch, vocab]: the last position's
    >>> logits = lm.forward(next_ids[:, None]) # one step more
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.kernels.native.build import available as native_available
from quantkit.kernels.native.matvec import bf16_matvec
from quantkit.models.arch import arch_for, get_module
from quantkit.runtime.lean_ops import attention, layer_windows, rms, rope_tables, rope_types, softcap, window_mask
from quantkit.runtime.native_decode import build_plan

_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


class LeanUnsupported(ValueError):
    """Why :class:`LeanLM` cannot run a model (callers fall back to transformers' forward)."""


def _check(model: nn.Module):
    try:
        spec = arch_for(model)
    except QuantkitError as e:  # not in the architecture table, or not shaped as its entry says
        raise LeanUnsupported(str(e)) from None
    cfg = model.config
    dec = next((d for d in spec.decode if cfg.model_type in d.model_types), None)
    if dec is None:
        raise LeanUnsupported(f"no lean forward for model_type {cfg.model_type!r}")
    rotary = get_module(model, dec.rotary)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise LeanUnsupported(f"partial rotary embeddings (factor {rope['partial_rotary_factor']})")
    for rope_type in rope_types(rotary):
        if rope_type not in _STATIC_ROPE:
            raise LeanUnsupported(f"rope_type {rope_type!r} depends on the sequence length")
    return spec, dec, rotary


def lean_or_none(model: nn.Module, max_len: int = 2048, batch: int = 1) -> tuple[LeanLM | None, str]:
    """``(LeanLM, "")`` or ``(None, why not)``."""
    try:
        return LeanLM(model, max_len, batch), ""
    except LeanUnsupported as e:
        return None, str(e)


class _Layer:
    __slots__ = ("attn_norm", "mlp_norm", "q", "k", "v", "o", "gate", "up", "down", "q_norm", "k_norm", "eps1", "eps2",
                 "eps_qk", "post_attn_norm", "post_mlp_norm", "eps3", "eps4", "act", "window", "rope", "qkv", "gate_up",
                 "moe")


def _layer(block: nn.Module, dec, window: int | None, rope: str) -> _Layer:
    """One block's modules (by the DecodeSpec's names), norm epsilons, window and RoPE table."""
    lay = _Layer()
    absent = ((("q", "k", "v") if dec.qkv else ()) + (("gate", "up") if dec.gate_up else ())  # fused linears
              + (("gate", "up", "down", "act") if dec.moe else ()))  # an MoE block's MLP is its router and experts
    for field in ("attn_norm", "mlp_norm", "q", "k", "v", "o", "gate", "up", "down", "act"):
        setattr(lay, field, None if field in absent else get_module(block, getattr(dec, field)))
    lay.qkv = get_module(block, dec.qkv) if dec.qkv else None
    lay.gate_up = get_module(block, dec.gate_up) if dec.gate_up else None
    lay.moe = get_module(block, dec.moe) if dec.moe else None  # router + experts (quantkit.models.moe.Experts), as one module
    lay.q_norm = get_module(block, dec.qk_norm[0]) if dec.qk_norm else None
    lay.k_norm = get_module(block, dec.qk_norm[1]) if dec.qk_norm else None
    lay.post_attn_norm = get_module(block, dec.post_attn_norm) if dec.post_attn_norm else None
    lay.post_mlp_norm = get_module(block, dec.post_mlp_norm) if dec.post_mlp_norm else None
    lay.eps1, lay.eps2 = _eps(lay.attn_norm), _eps(lay.mlp_norm)
    lay.eps3 = _eps(lay.post_attn_norm) if lay.post_attn_norm is not None else None
    lay.eps4 = _eps(lay.post_mlp_norm) if lay.post_mlp_norm is not None else None
    lay.eps_qk = (_eps(lay.q_norm), _eps(lay.k_norm)) if dec.qk_norm else None
    lay.window, lay.rope = window, rope
    return lay


class LeanLM:
    """Prefill and decode steps over the model's own modules with a static cache of ``max_len``
    positions per sequence.  :meth:`reset` empties the cache (or resizes it for a new batch)."""

    def __init__(self, model: nn.Module, max_len: int = 2048, batch: int = 1, native: bool = True,
                 capacity: int | None = None):
        spec, dec, rotary = _check(model)
        cfg = model.config
        self.model = model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.embed = get_module(model, spec.embeddings[0])
        self.norm = get_module(model, spec.final_norm)
        self.head = get_module(model, spec.lm_head)
        self.eps, self.offset = _eps(self.norm), dec.norm_offset
        self.attn_cap = getattr(cfg, "attn_logit_softcapping", None)
        self.final_cap = getattr(cfg, "final_logit_softcapping", None)
        blocks = spec.blocks(model)
        windows = [w if w and w < max_len else None for w in layer_windows(cfg, len(blocks))]  # wider: no effect
        types = getattr(cfg, "layer_types", None) if getattr(rotary, "layer_types", None) else None
        self.layers = [_layer(block, dec, windows[i], types[i] if types else "default") for i, block in enumerate(blocks)]
        attn = get_module(blocks[0], dec.attention)
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.tables = rope_tables(rotary, max_len, self.head_dim, self.dtype, self.device)
        self.cos, self.sin = self.tables[self.layers[0].rope]  # [max_len, head_dim]: the first layer type's
        # a CUDA graph replays fixed kernels: an MoE block picks its experts on the host each token
        self.graphable = all(lay.moe is None for lay in self.layers)
        self.max_len = max_len  # positions a sequence may reach (the RoPE tables)
        # cache columns allocated now (grown by `reserve` up to max_len); default: all of them
        self.capacity = max_len if capacity is None else max(1, min(capacity, max_len))
        self._positions = torch.arange(max_len, device=self.device)  # the masks of the filled prefix
        self.set_native(native)
        # attention (and the cache) in float32 on a CPU: PyTorch's bfloat16 attention for one query
        # costs 100-300 us a layer there against 35-75 us in float32 (measured, 2 threads)
        self.attn_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.reset(batch)

    def set_native(self, on: bool) -> None:
        """Whether one sequence's single-token steps may take the native decode step and a bf16 head
        the native matrix-vector product (CPU only); off: the torch ops, as a batch of rows runs."""
        self.native = on and self.device.type == "cpu"
        self._head_matvec = self.native and _bf16_head(self.head)
        self._plan = None  # the native decode step (built at the first single-token step), False if it cannot run

    def reset(self, batch: int = 1) -> None:
        shape = (batch, self.n_kv, self.capacity, self.head_dim)
        if getattr(self, "k_cache", None) is None or self.k_cache[0].shape != shape:
            self._allocate(shape)
        self.pos = 0

    def _allocate(self, shape: tuple[int, ...], keep: tuple[int, int] = (0, 0)) -> None:
        """New caches of ``shape``; the first ``keep = (rows, columns)`` of the old ones copied in."""
        rows, cols = keep

        def fresh(old: torch.Tensor | None) -> torch.Tensor:
            t = torch.zeros(shape, dtype=self.attn_dtype, device=self.device)
            if old is not None and rows and cols:
                t[:rows, :, :cols] = old[:rows, :, :cols]
            return t

        none = [None] * len(self.layers)
        k = [fresh(t) for t in getattr(self, "k_cache", None) or none]
        v = [fresh(t) for t in getattr(self, "v_cache", None) or none]
        self.k_cache, self.v_cache = k, v  # both or neither (an allocation failure leaves the old pair)
        self.capacity = shape[2]
        self._plan = None  # the native step points into the caches
        self.graphed = None  # a captured CUDA-graph step (quantkit.runtime.cudagraph) reads these caches

    def reserve(self, rows: int, columns: int) -> None:
        """Room for at least ``rows`` sequences of ``columns`` positions, what is cached kept (the
        columns double, up to :attr:`max_len`).  For the serving engine's growing batches."""
        b, cap = self.k_cache[0].shape[0], self.capacity
        if rows <= b and columns <= cap:
            return
        if columns > self.max_len:
            raise ValueError(f"the lean cache holds {self.max_len} positions; {columns} needed")
        while cap < columns:
            cap *= 2
        self._allocate((max(rows, b), self.n_kv, min(cap, self.max_len), self.head_dim), keep=(b, self.capacity))

    # ---- the forward ------------------------------------------------------------------
    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + x.roll(self.head_dim // 2, -1) * sin

    def _blocks(self, x: torch.Tensor, pick, attend) -> torch.Tensor:
        """Every block on ``x [b, n, hidden]``; ``pick(table)`` takes the rows of a RoPE table for the
        positions at hand (broadcasting against ``[b, n, heads, hd]``); ``attend(i, lay, q, k, v)``
        stores block i's keys and values (``[b, n_kv, n, hd]``, RoPE applied) where its caller keeps
        them and returns the attention of ``q [b, n_heads, n, hd]`` (attention dtype)."""
        b, n, _ = x.shape
        hd, nh, nkv, off = self.head_dim, self.n_heads, self.n_kv, self.offset
        rows = {t: (pick(cos), pick(sin)) for t, (cos, sin) in self.tables.items()}
        for i, lay in enumerate(self.layers):
            cos, sin = rows[lay.rope]
            h = rms(x, lay.attn_norm.weight, lay.eps1, off)
            if lay.qkv is None:
                q, k, v = lay.q(h), lay.k(h), lay.v(h)
            else:
                q, k, v = lay.qkv(h).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q, k, v = q.reshape(b, n, nh, hd), k.reshape(b, n, nkv, hd), v.reshape(b, n, nkv, hd)
            if lay.q_norm is not None:
                q, k = rms(q, lay.q_norm.weight, lay.eps_qk[0], off), rms(k, lay.k_norm.weight, lay.eps_qk[1], off)
            q = self._rope(q, cos, sin).transpose(1, 2).to(self.attn_dtype)
            a = attend(i, lay, q, self._rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2))
            a = lay.o(a.transpose(1, 2).reshape(b, n, nh * hd).to(x.dtype))
            x = x + (a if lay.post_attn_norm is None else rms(a, lay.post_attn_norm.weight, lay.eps3, off))
            h = rms(x, lay.mlp_norm.weight, lay.eps2, off)
            if lay.moe is not None:
                m = lay.moe(h)
                m = m[0] if isinstance(m, tuple) else m
            elif lay.gate_up is None:
                m = lay.down(lay.act(lay.gate(h)) * lay.up(h))
            else:
                gate, up = lay.gate_up(h).chunk(2, dim=-1)
                m = lay.down(up * lay.act(gate))
            x = x + (m if lay.post_mlp_norm is None else rms(m, lay.post_mlp_norm.weight, lay.eps4, off))
        return x

    def _prefix(self, ids: torch.Tensor, start: int, k_cache: list, v_cache: list) -> torch.Tensor:
        """Continue the sequences of ``k_cache``/``v_cache`` (per block ``[b, n_kv, columns, hd]``,
        ``start`` filled) by ``ids [b, n]``: the last position's hidden state ``[b, hidden]``."""
        n = ids.shape[1]
        end = start + n
        masks = {w: window_mask(start, n, w, ids.device) for w in {lay.window for lay in self.layers}}

        def attend(i, lay, q, k, v):
            kc, vc = k_cache[i], v_cache[i]
            kc[:, :, start:end] = k
            vc[:, :, start:end] = v
            lo = max(0, end - lay.window) if lay.window and n == 1 else 0  # a step sees the window's keys only
            mask = masks[lay.window]
            return attention(q, kc[:, :, lo:end], vc[:, :, lo:end], scale=self.scaling, mask=mask,
                             causal=mask is None and n > 1, cap=self.attn_cap)

        return self._blocks(self.embed(ids), lambda t: t[start:end, None, :], attend)[:, -1]  # [n, 1, hd] rows

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [batch, n]`` continue every sequence of the cache by ``n`` tokens; returns the
        logits of the last one ``[batch, vocab]`` (float32)."""
        b, n = ids.shape
        start, end = self.pos, self.pos + n
        if end > self.capacity:
            raise ValueError(f"the lean cache holds {self.capacity} positions; {end} needed")
        if n == 1 and b == 1 and self.native and self._native_plan():
            logits = self._native_step(ids[0, 0], start)
        else:
            logits = self._logits(self._final(self._prefix(ids, start, self.k_cache, self.v_cache)))
        self.pos = end
        return logits

    def _native_step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Row 0's token at ``pos`` through the native decode step: logits ``[1, vocab]``."""
        x = self.embed(token.reshape(1))[0].float().contiguous()
        self._plan.step(x, pos)
        return self._logits(self._final(x.to(self.dtype)[None]))

    # ---- rows: sequences of their own lengths in one batch (the serving engine) ---------------
    @torch.inference_mode()
    def prefill_row(self, row: int, ids: torch.Tensor) -> torch.Tensor:
        """Start cache row ``row`` over with the prompt ``ids [1, n]`` (rows beyond the batch are
        allocated); returns its last logits ``[1, vocab]``.  The other rows are left as they are."""
        self.reserve(row + 1, ids.shape[1])
        views = lambda cache: [c[row:row + 1] for c in cache]  # noqa: E731
        return self._logits(self._final(self._prefix(ids, 0, views(self.k_cache), views(self.v_cache))))

    @torch.inference_mode()
    def step_rows(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token for each of cache rows ``0..b-1``: ``ids [b, 1]``, row r's at position
        ``pos[r]`` (a long tensor ``[b]``; rows 0..pos[r]-1 filled) -> logits ``[b, vocab]``.
        A lone row 0 takes :meth:`forward`'s step (the native one where it runs); several rows share
        every matmul and attend one by one, each over its own prefix."""
        b = ids.shape[0]
        if b == 1:  # a lone row: generate's own step (the native one, or the torch ops of `forward`)
            at = int(pos[0])
            self.reserve(1, at + 1)  # first: growing the cache rebuilds the native plan over the new one
            if self.native and self._native_plan():
                return self._native_step(ids[0, 0], at)
            one = self.k_cache[0].shape[0] == 1  # else views of row 0 (a batch that shrank to one row)
            kc, vc = (self.k_cache, self.v_cache) if one else ([c[:1] for c in self.k_cache], [c[:1] for c in self.v_cache])
            return self._logits(self._final(self._prefix(ids, at, kc, vc)))
        ends = (pos + 1).tolist()
        self.reserve(b, max(ends))
        rows = torch.arange(b, device=pos.device)

        def attend(i, lay, q, k, v):
            # each row attends its own prefix, as it would alone: a masked batched attention reduces in
            # another order, and a rounding difference there flipped greedy tokens of an int4 SmolLM2
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[rows, :, pos] = k[:, :, 0].to(kc.dtype)
            vc[rows, :, pos] = v[:, :, 0].to(vc.dtype)
            los = [max(0, e - lay.window) if lay.window else 0 for e in ends]
            return torch.cat([attention(q[r:r + 1], kc[r:r + 1, :, lo:e], vc[r:r + 1, :, lo:e], scale=self.scaling,
                                        cap=self.attn_cap) for r, (lo, e) in enumerate(zip(los, ends))])

        h = self._blocks(self.embed(ids), lambda t: t[pos][:, None, None, :], attend)[:, -1]  # [b, 1, 1, hd] rows
        return self._logits(self._final(h))

    @torch.inference_mode()
    def keep_rows(self, rows: list[int], columns: int) -> None:
        """Move cache rows ``rows`` (in that order) to the front, their first ``columns`` positions."""
        if rows == list(range(len(rows))) or not rows:
            return
        idx = torch.tensor(rows, device=self.device)
        for cache in (self.k_cache, self.v_cache):
            for c in cache:
                c[:len(rows), :, :columns] = c[idx, :, :columns]

    @torch.inference_mode()
    def static_step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per sequence (``ids [batch, 1]``) at position ``pos`` (a 0-d long tensor on the
        model's device) -> ``[batch, vocab]`` float32 logits, with every shape and address fixed
        from step to step: the cache row is written with ``index_copy_`` and attention reads the
        whole cache under a mask of the filled positions.  That is what a CUDA graph can capture
        (:class:`quantkit.runtime.cudagraph.GraphedDecode`); it does not move :attr:`pos`."""
        at = pos.reshape(1)
        filled = self._positions[:self.capacity]
        masks = {w: ((filled <= pos) & (filled > pos - w) if w else filled <= pos)[None, None, None, :]
                 for w in {lay.window for lay in self.layers}}  # [1, 1, 1, capacity]: the positions attended

        def attend(i, lay, q, k, v):
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc.index_copy_(2, at, k.to(kc.dtype))
            vc.index_copy_(2, at, v.to(vc.dtype))
            return attention(q, kc, vc, scale=self.scaling, mask=masks[lay.window], cap=self.attn_cap)

        x = self._blocks(self.embed(ids), lambda t: t.index_select(0, at)[:, None, :], attend)  # [1, 1, hd] rows
        return softcap(self.head(self._final(x[:, -1])).float(), self.final_cap)

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        return rms(h, self.norm.weight, self.eps, self.offset)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[b, hidden] -> [b, vocab]`` float32: a bf16 head for one sequence on quantkit's native
        matrix-vector product (PyTorch's reads ~9 GB/s on a CPU), anything else through the module."""
        if self._head_matvec and h.shape[0] == 1:
            return softcap(bf16_matvec(h[0], self.head.weight)[None], self.final_cap)
        return softcap(self.head(h).float(), self.final_cap)

    @property
    def native_step(self) -> bool:
        """Whether single-token steps have been running as one native call (see :meth:`_native_plan`)."""
        return bool(self._plan)

    def _native_plan(self) -> bool:
        """Whether every block can run as one native call per token (quantkit's int4 CPU kernel on
        every linear but the head and routers, biases only on q/k/v, batch 1; the families and
        routers :func:`quantkit.runtime.native_decode.build_plan` lists); builds the plan once."""
        if self._plan is None:
            self._plan = build_plan(self) or False
        return self._plan is not False


def _bf16_head(head: nn.Module) -> bool:
    return (type(head) is nn.Linear and head.bias is None and head.weight.dtype == torch.bfloat16
            and head.weight.is_contiguous() and native_available())


def _eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise LeanUnsupported(f"{type(norm).__name__} has no epsilon attribute")
