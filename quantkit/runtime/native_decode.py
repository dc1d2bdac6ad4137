"""The native decode step: every block of a Llama-style model in one C call per token.

:class:`~quantkit.runtime.lean.LeanLM`'s single-token step for one sequence, when every linear of
every block runs on quantkit's native int4 CPU kernel: :func:`build_plan` checks that, collects
each block's converted weights, norms and cache into a :class:`DecodePlan`, and
:meth:`DecodePlan.step` makes the one call (``kernels/decode_step.c`` through
:mod:`quantkit.kernels.native.decode`).  Its pure-torch reference is LeanLM's own forward
(tests/runtime/test_lean.py).

    >>> plan = build_plan(lean_lm)                # doctest: +SKIP   None: the torch ops run instead
    >>> plan.step(x, pos)                         # x float32 [hidden], updated in place
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.core.rotation import OnlineHadamard
from quantkit.kernels.native import decode as native_decode
from quantkit.kernels.native.build import DecodeDimsStruct, available
from quantkit.kernels.native.int4 import NativeInt4Weight
from quantkit.runtime.qlinear import QuantLinear


@dataclass
class DecodeLayer:
    """One block for :class:`DecodePlan`: its seven int4 weights, q/k/v biases (float32 or None),
    RMSNorm weights (float32), epsilons and its float32 KV cache ``[n_kv, max_len, head_dim]``."""

    weights: tuple[NativeInt4Weight, ...]  # q, k, v, o, gate, up, down
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
    norm1: torch.Tensor
    norm2: torch.Tensor
    eps1: float
    eps2: float
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    had: torch.Tensor | None = None  # the rotation's online Hadamard before down: its float32 factor [k, k]


class DecodePlan:
    """Every block of a model for ``qk_decode_layers``: one ctypes call per decoded token.
    Holds references to every tensor it points into, and the float32 RoPE tables ``cos``/``sin``
    ``[max_len, head_dim]`` (``sin`` carrying rotate_half's sign, as LeanLM's)."""

    def __init__(self, layers: list[DecodeLayer], dims: DecodeDimsStruct, cos: torch.Tensor, sin: torch.Tensor):
        self.layers, self.dims = layers, dims
        self.cos, self.sin = cos.float().contiguous(), sin.float().contiguous()
        self._structs = native_decode.layer_array([
            native_decode.layer_struct(lay.weights, lay.biases, lay.norm1, lay.norm2, lay.eps1, lay.eps2, lay.k_cache,
                                       lay.v_cache, lay.had) for lay in layers])

    def step(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """``x`` float32 ``[hidden]`` (the embedding of the token at ``pos``, contiguous), updated in
        place to the last block's output."""
        if x.numel() != self.dims.d:
            raise ValueError(f"the plan's blocks take {self.dims.d} features, not {x.numel()}")
        if not 0 <= pos < self.dims.max_len:  # the C step writes the cache unchecked
            raise ValueError(f"position {pos} is outside the plan's cache of {self.dims.max_len} positions")
        return native_decode.decode_layers(self._structs, self.dims, x, pos, self.cos[pos], self.sin[pos])


def _block_modules(lay) -> tuple:
    return lay.q, lay.k, lay.v, lay.o, lay.gate, lay.up, lay.down


def _native_weights(mods: tuple, dtype: torch.dtype, device: torch.device) -> tuple[NativeInt4Weight, ...] | None:
    """The seven linears' weights on the native int4 kernel, or None if any runs elsewhere
    (not a QuantLinear, a bias past q/k/v, another layout).  Chooses each module's path for
    ``dtype`` inputs on ``device`` if its first forward has not yet (that converts the weight)."""
    if not all(isinstance(m, QuantLinear) for m in mods) or any(m.bias is not None for m in mods[3:]):
        return None
    if any(m.act_bits for m in mods):  # integer activations: the C step's are bf16
        return None
    for m in mods:
        m.prepare(torch.zeros(1, 1, m.in_features, dtype=dtype, device=device))
    weights = tuple(m.kernel_weight for m in mods)
    return weights if all(isinstance(w, NativeInt4Weight) for w in weights) else None


def _online_factor(mods: tuple) -> tuple[bool, torch.Tensor | None]:
    """``(runnable, factor)``: the C step applies a rotation's online Hadamard transform on down's
    input (``factor``: its float32 ``[k, k]`` part); any other input transform keeps it from running."""
    if any(m._forward_pre_hooks for m in mods[:-1]):
        return False, None
    hooks = list(mods[-1]._forward_pre_hooks.values())
    if not hooks:
        return True, None
    if len(hooks) > 1 or not isinstance(hooks[0], OnlineHadamard):
        return False, None
    t = hooks[0].transform
    if t.n != mods[-1].in_features or t.n != mods[4].out_features:  # the C step transforms gate's `inter` outputs
        return False, None
    return True, t.factor.contiguous()


def build_plan(lm) -> DecodePlan | None:
    """A :class:`DecodePlan` over ``lm``'s (a :class:`~quantkit.runtime.lean.LeanLM`) blocks and
    cache row 0 (the one sequence it decodes), or None where the step cannot run: the kernels
    unavailable, attention not in float32, q/k norms, heads not shared evenly by the kv heads, or
    a linear not on the native int4 kernel."""
    if not available() or lm.attn_dtype != torch.float32 or not lm.plain:  # plain: Llama's block exactly
        return None
    if lm.layers[0].q_norm is not None or lm.n_heads % lm.n_kv:
        return None
    layers = []
    for lay, kc, vc in zip(lm.layers, lm.k_cache, lm.v_cache):
        mods = _block_modules(lay)
        weights = _native_weights(mods, lm.dtype, lm.device)
        runnable, had = _online_factor(mods)
        if weights is None or not runnable or lay.gate.out_features != lm.layers[0].gate.out_features:
            return None
        biases = tuple(None if m.bias is None else m.bias.detach().float().contiguous() for m in mods[:3])
        layers.append(DecodeLayer(weights, biases, lay.attn_norm.weight.detach().float().contiguous(),
                                  lay.mlp_norm.weight.detach().float().contiguous(), lay.eps1, lay.eps2, kc[0], vc[0], had))
    dims = native_decode.decode_dims(lm.layers[0].q.in_features, lm.n_heads, lm.n_kv, lm.head_dim,
                                     layers[0].weights[4].out_features, lm.capacity, lm.scaling)
    return DecodePlan(layers, dims, lm.cos, lm.sin)

