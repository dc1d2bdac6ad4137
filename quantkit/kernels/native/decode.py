"""The ctypes side of ``kernels/decode_step.c``: one decode step of Llama-style blocks (Qwen3, Gemma
1-3, Phi-3 and softmax-routed mixtures of experts included) in one call.

Thin on purpose: it fills the C structs and makes the call.  Which models can run it, and the
plan that holds every tensor the structs point into, are the runtime's
(:mod:`quantkit.runtime.native_decode`).

    >>> structs = [layer_struct(ws, biases, n1, n2, 1e-5, 1e-5, kc, vc), ...]  # doctest: +SKIP
    >>> layers = layer_array(structs)  # a copy: keep `structs` alive (they hold the experts' pointer arrays)
    >>> decode_layers(layers, decode_dims(64, 8, 4, 8, 172, 256, 8 ** -0.5), x, pos, cos, sin)
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from quantkit.kernels.native.build import DecodeDimsStruct, Int4WeightStruct, LayerStruct, library, ptr
from quantkit.kernels.native.int4 import NativeInt4Weight

WEIGHT_NAMES = ("q", "k", "v", "o", "gate", "up", "down")  # the order of a layer's seven weights
ACTS = ("silu", "gelu_tanh")  # QK_ACT_* in qk.h, in that order
MAX_TOP_K = 64  # experts per token the C step takes (a fixed array there)


def layer_struct(weights: Sequence[NativeInt4Weight | None], biases: Sequence[torch.Tensor | None], norm1: torch.Tensor,
                 norm2: torch.Tensor, eps1: float, eps2: float, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, had: torch.Tensor | None = None, *, qk_norms=(None, None), eps_qk=(0.0, 0.0),
                 post_norms=(None, None), eps_post=(0.0, 0.0), rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                 window: int = 0, act: str = "silu", moe: dict | None = None) -> LayerStruct:
    """``qk_layer`` for one block: seven weights (``WEIGHT_NAMES`` order; gate/up/down None in a
    mixture-of-experts block; k/v None where q is Phi-3's fused q|k|v, up None where gate is its gate|up), q/k/v biases (float32 ``[out]`` or None), RMSNorm weights float32
    ``[d]``, and its float32 cache ``[n_kv, max_len, head_dim]``; ``had``: float32 ``[k, k]``, the
    factor ``A`` of an online Hadamard transform ``x kron(A, H_p)`` on down's input (None: none).
    What other families add: per-head ``qk_norms`` (float32 ``[head_dim]``), sandwich ``post_norms``
    (``[d]``), the layer's own RoPE tables ``rope`` (float32 ``[max_len, head_dim]``), a sliding
    ``window`` (0: none), ``act`` (one of :data:`ACTS`), and ``moe``: ``{"router": float32 [E, d],
    "experts": [(gate, up, down), ...], "top_k": k, "norm_topk": bool}`` (optionally ``"shared":
    (gate, up, down)`` and ``"shared_gate"``: float32 ``[d]``, Qwen2-MoE's shared expert).  Holds raw pointers:
    the caller keeps every tensor alive (the experts' pointer array is kept on the struct)."""
    st = LayerStruct()
    for name, w in zip(WEIGHT_NAMES, weights, strict=True):
        setattr(st, name, None if w is None else w.desc)
    st.bq, st.bk, st.bv = (ptr(b) for b in biases)
    st.norm1, st.norm2 = norm1.data_ptr(), norm2.data_ptr()
    st.eps1, st.eps2 = eps1, eps2
    st.k_cache, st.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
    st.had, st.had_k = ptr(had), 0 if had is None else had.shape[0]
    st.q_norm, st.k_norm = (ptr(t) for t in qk_norms)
    st.eps_q, st.eps_k = eps_qk
    st.post_attn_norm, st.post_mlp_norm = (ptr(t) for t in post_norms)
    st.eps3, st.eps4 = eps_post
    st.rope_cos, st.rope_sin = (None, None) if rope is None else (rope[0].data_ptr(), rope[1].data_ptr())
    st.window, st.act = window, ACTS.index(act)
    if moe is not None:
        if moe["top_k"] > MAX_TOP_K:
            raise ValueError(f"the decode step takes at most {MAX_TOP_K} experts per token, not {moe['top_k']}")
        descs = [w.desc for triple in moe["experts"] for w in triple]
        keep = (ctypes.POINTER(Int4WeightStruct) * len(descs))(*descs)
        st.n_experts, st.top_k, st.norm_topk = len(moe["experts"]), moe["top_k"], int(moe["norm_topk"])
        st.router, st.experts = moe["router"].data_ptr(), ctypes.addressof(keep)
        shared = moe.get("shared")
        if shared is not None:
            keep = (keep, (ctypes.POINTER(Int4WeightStruct) * 3)(*(w.desc for w in shared)))
            st.shared, st.shared_gate = ctypes.addressof(keep[1]), ptr(moe.get("shared_gate"))
        st._keep = keep  # the pointer arrays must outlive the struct's use
    return st


def layer_array(layers: Sequence[LayerStruct]) -> ctypes.Array:
    """The structs side by side, as ``qk_decode_layers`` reads them."""
    return (LayerStruct * len(layers))(*layers)


def decode_dims(hidden: int, n_heads: int, n_kv: int, head_dim: int, intermediate: int, max_len: int,
                scale: float, attn_cap: float | None = None, max_experts: int = 0) -> DecodeDimsStruct:
    """``qk_decode_dims``: the sizes every block shares (``n_heads`` a multiple of ``n_kv``;
    ``intermediate`` the widest MLP, an expert's included; ``attn_cap`` Gemma 2's score soft-cap)."""
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} heads do not share {n_kv} kv heads evenly")
    return DecodeDimsStruct(hidden, n_heads, n_kv, head_dim, intermediate, max_len, scale, attn_cap or 0.0, max_experts)


def decode_layers(layers: ctypes.Array, dims: DecodeDimsStruct, x: torch.Tensor, pos: int, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """``x`` float32 ``[hidden]`` (contiguous), updated in place through every block at position
    ``pos`` (its k/v written to each cache); ``cos``/``sin`` float32 ``[head_dim]`` for ``pos``."""
    rc = library().qk_decode_layers(ctypes.addressof(layers), len(layers), ctypes.byref(dims), x.data_ptr(), pos,
                                    cos.data_ptr(), sin.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("quantkit decode step: out of memory for its buffers")
    return x
