"""What the lean forward (:mod:`quantkit.runtime.lean`) computes differently by family, written once:
RMSNorm with Llama's or Gemma's weighting, attention with an optional logit soft-cap, per-layer
sliding windows, and RoPE tables per layer type (Gemma 3's local and global layers).

Each follows the transformers modelling code it replaces (the tests compare logits):

* Llama's RMSNorm normalises in float32 and multiplies the weight in the input's dtype; Gemma's
  multiplies ``(1 + w)`` in float32 (``offset`` 1);
* Gemma 2 soft-caps attention scores as ``tanh(s / cap) * cap`` before the mask and the softmax
  (then attention is computed here, not by SDPA, which has no cap), and the logits likewise;
* a sliding window ``w`` lets a query at position p attend keys k with ``p - k < w``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm as the family computes it (float32 statistics; see the module docstring)."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if offset:
        return (normed * (offset + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: torch.Tensor | None = None,
              causal: bool = False, cap: float | None = None) -> torch.Tensor:
    """``q [b, heads, n, hd]`` over ``k``/``v [b, kv_heads, L, hd]`` (grouped-query heads shared);
    ``mask`` broadcasts to ``[b, heads, n, L]`` (True: attend), ``causal``: the last n keys are the
    queries' own positions."""
    gqa = k.shape[1] != q.shape[1]
    if cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    if gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    scores = softcap((q @ k.transpose(-1, -2)) * scale, cap)
    n, L = q.shape[-2], k.shape[-2]
    if causal:
        mask = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(L - n)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


def window_mask(start: int, n: int, window: int | None, device) -> torch.Tensor | None:
    """``[n, start + n]`` keys each of n queries (positions start..start+n-1) may attend, or None where
    plain causal attention is exact (no window, or every key within it) or for a single query."""
    end = start + n
    if n == 1:  # one query: the caller reads the window's keys only
        return None
    if window is None or end <= window:
        return torch.ones(n, end, dtype=torch.bool, device=device).tril(start) if start and n > 1 else None
    q = torch.arange(start, end, device=device)[:, None]
    k = torch.arange(end, device=device)[None, :]
    return (k <= q) & (q - k < window)


def layer_windows(config, n_layers: int) -> list[int | None]:
    """Each layer's sliding window (None: full attention), from ``layer_types`` where the config has
    them, else ``sliding_window`` for every layer unless ``use_sliding_window`` is False."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return [None] * n_layers
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [None if getattr(config, "use_sliding_window", True) is False else window] * n_layers


def rope_tables(rotary: nn.Module, max_len: int, head_dim: int, dtype, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer type: (cos, sin)}``, each ``[max_len, head_dim]`` from the model's own rotary module
    (``sin`` carrying rotate_half's sign); one ``"default"`` table unless the module keeps one per
    layer type (Gemma 3: ``sliding_attention`` and ``full_attention``)."""
    pos = torch.arange(max_len, device=device)[None]
    probe = torch.zeros(1, 1, head_dim, dtype=dtype, device=device)
    types = getattr(rotary, "layer_types", None)
    half = head_dim // 2
    out = {}
    with torch.no_grad():
        for t in types or ["default"]:
            cos, sin = rotary(probe, pos, t) if types else rotary(probe, pos)
            out[t] = cos[0].contiguous(), torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).contiguous()
    return out


def rope_types(rotary: nn.Module) -> list[str]:
    """The rope_type of each table (Gemma 3 keeps a dict by layer type)."""
    kind = getattr(rotary, "rope_type", "default")
    return list(kind.values()) if isinstance(kind, dict) else [kind]
