"""The ctypes side of ``kernels/decode_step.c``: one decode step of Llama-style blocks in one call.

Thin on purpose: it fills the C structs and makes the call.  Which models can run it, and the
plan that holds every tensor the structs point into, are the runtime's
(:mod:`quantkit.runtime.native_decode`).

    >>> layers = layer_array([layer_struct(ws, biases, n1, n2, 1e-5, 1e-5, kc, vc), ...])  # doctest: +SKIP
    >>> decode_layers(layers, decode_dims(64, 8, 4, 8, 172, 256, 8 ** -0.5), x, pos, cos, sin)
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from quantkit.kernels.native.build import DecodeDimsStruct, LayerStruct, library, ptr
from quantkit.kernels.native.int4 import NativeInt4Weight

WEIGHT_NAMES = ("q", "k", "v", "o", "gate", "up", "down")  # the order of a layer's seven weights


def layer_struct(weights: Sequence[NativeInt4Weight], biases: Sequence[torch.Tensor | None], norm1: torch.Tensor,
                 norm2: torch.Tensor, eps1: float, eps2: float, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, had: torch.Tensor | None = None) -> LayerStruct:
    """``qk_layer`` for one block: seven weights (``WEIGHT_NAMES`` order), q/k/v biases (float32
    ``[out]`` or None), RMSNorm weights float32 ``[d]``, and its float32 cache ``[n_kv, max_len,
    head_dim]``; ``had``: float32 ``[k, k]``, the factor ``A`` of an online Hadamard transform
    ``x kron(A, H_p)`` on down's input (None: none).  Holds raw pointers: the caller keeps every
    tensor alive."""
    st = LayerStruct()
    for name, w in zip(WEIGHT_NAMES, weights, strict=True):
        setattr(st, name, w.desc)
    st.bq, st.bk, st.bv = (ptr(b) for b in biases)
    st.norm1, st.norm2 = norm1.data_ptr(), norm2.data_ptr()
    st.eps1, st.eps2 = eps1, eps2
    st.k_cache, st.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
    st.had, st.had_k = ptr(had), 0 if had is None else had.shape[0]
    return st


def layer_array(layers: Sequence[LayerStruct]) -> ctypes.Array:
    """The structs side by side, as ``qk_decode_layers`` reads them."""
    return (LayerStruct * len(layers))(*layers)


def decode_dims(hidden: int, n_heads: int, n_kv: int, head_dim: int, intermediate: int, max_len: int,
                scale: float) -> DecodeDimsStruct:
    """``qk_decode_dims``: the sizes every block shares (``n_heads`` a multiple of ``n_kv``)."""
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} heads do not share {n_kv} kv heads evenly")
    return DecodeDimsStruct(hidden, n_heads, n_kv, head_dim, intermediate, max_len, scale)


def decode_layers(layers: ctypes.Array, dims: DecodeDimsStruct, x: torch.Tensor, pos: int, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """``x`` float32 ``[hidden]`` (contiguous), updated in place through every block at position
    ``pos`` (its k/v written to each cache); ``cos``/``sin`` float32 ``[head_dim]`` for ``pos``."""
    rc = library().qk_decode_layers(ctypes.addressof(layers), len(layers), ctypes.byref(dims), x.data_ptr(), pos,
                                    cos.data_ptr(), sin.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("quantkit decode step: out of memory for its buffers")
    return x
