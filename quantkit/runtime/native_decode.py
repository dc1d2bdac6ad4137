"""The native decode step: every block of a decoder in one C call per token.

:class:`~quantkit.runtime.lean.LeanLM`'s single-token step for one sequence, when every linear of
every block runs on quantkit's native int4 CPU kernel (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3
and, for float32 models, the softmax-routed mixtures of experts, Qwen3-MoE, Qwen2-MoE (its shared
expert too) and Mixtral, whose experts are chosen in C):
:func:`build_plan` checks that, collects each block's converted weights, norms and cache into a
:class:`DecodePlan`, and
:meth:`DecodePlan.step` makes the one call (``kernels/decode_step.c`` through
:mod:`quantkit.kernels.native.decode`).  Its pure-torch reference is LeanLM's own forward
(tests/runtime/test_lean.py).

    >>> plan = build_plan(lean_lm)                # doctest: +SKIP   None: the torch ops run instead
    >>> plan.step(x, pos)                         # x float32 [hidden], updated in place
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantkit.core.rotation import OnlineHadamard
from quantkit.kernels.native import decode as native_decode
from quantkit.kernels.native.build import DecodeDimsStruct, available
from quantkit.kernels.native.int4 import NativeInt4Weight
from quantkit.models.moe import Experts
from quantkit.runtime.qlinear import QuantLinear


@dataclass
class DecodeLayer:
    """One block for :class:`DecodePlan`: its int4 weights, q/k/v biases (float32 or None),
    RMSNorm weights (float32, Gemma's ``1 + w`` folded in), epsilons, its float32 KV cache
    ``[n_kv, max_len, head_dim]``, and what other families add (see ``decode.layer_struct``)."""

    weights: tuple[NativeInt4Weight | None, ...]  # q, k, v, o, gate, up, down (the MLP's three None under experts)
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
    norm1: torch.Tensor
    norm2: torch.Tensor
    eps1: float
    eps2: float
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    had: torch.Tensor | None = None  # the rotation's online Hadamard before down: its float32 factor [k, k]
    extra: dict = field(default_factory=dict)  # qk_norms, eps_qk, post_norms, eps_post, rope, window, act, moe


class DecodePlan:
    """Every block of a model for ``qk_decode_layers``: one ctypes call per decoded token.
    Holds references to every tensor it points into, and the float32 RoPE tables ``cos``/``sin``
    ``[max_len, head_dim]`` (``sin`` carrying rotate_half's sign, as LeanLM's) of the layers
    without their own."""

    def __init__(self, layers: list[DecodeLayer], dims: DecodeDimsStruct, cos: torch.Tensor, sin: torch.Tensor):
        self.layers, self.dims = layers, dims
        self.cos, self.sin = cos.float().contiguous(), sin.float().contiguous()
        self._struct_list = [native_decode.layer_struct(lay.weights, lay.biases, lay.norm1, lay.norm2, lay.eps1, lay.eps2,
                                                        lay.k_cache, lay.v_cache, lay.had, **lay.extra) for lay in layers]
        self._structs = native_decode.layer_array(self._struct_list)  # the list keeps the experts' pointer arrays

    def step(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """``x`` float32 ``[hidden]`` (the embedding of the token at ``pos``, contiguous), updated in
        place to the last block's output."""
        if x.numel() != self.dims.d:
            raise ValueError(f"the plan's blocks take {self.dims.d} features, not {x.numel()}")
        if not 0 <= pos < self.dims.max_len:  # the C step writes the cache unchecked
            raise ValueError(f"position {pos} is outside the plan's cache of {self.dims.max_len} positions")
        return native_decode.decode_layers(self._structs, self.dims, x, pos, self.cos[pos], self.sin[pos])


# the routers the C step reproduces (softmax over every expert, then the top k), by class name ->
# whether the chosen weights are renormalised (True/False) or the attribute that says so
SOFTMAX_TOPK_ROUTERS = {"Qwen3MoeTopKRouter": "norm_topk_prob", "Qwen2MoeTopKRouter": "norm_topk_prob",
                        "MixtralTopKRouter": True}
ACT_NAMES = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}


def _native_weights(mods: tuple, dtype: torch.dtype, device: torch.device,
                    n_biased: int = 0) -> tuple[NativeInt4Weight, ...] | None:
    """The linears' weights on the native int4 kernel, or None if any runs elsewhere (not a
    QuantLinear, a bias past the first ``n_biased``, another layout).  Chooses each module's path
    for ``dtype`` inputs on ``device`` if its first forward has not yet (that converts the weight)."""
    if not all(isinstance(m, QuantLinear) for m in mods) or any(m.bias is not None for m in mods[n_biased:]):
        return None
    if any(m.act_bits for m in mods):  # integer activations: the C step's are bf16
        return None
    for m in mods:
        m.prepare(torch.zeros(1, 1, m.in_features, dtype=dtype, device=device))
    weights = tuple(m.kernel_weight for m in mods)
    return weights if all(isinstance(w, NativeInt4Weight) for w in weights) else None


def _online_factor(mods: tuple) -> tuple[bool, torch.Tensor | None]:
    """``(runnable, factor)``: the C step applies a rotation's online Hadamard transform on down's
    input (``mods[-1]``; ``factor``: its float32 ``[k, k]`` part); any other input transform keeps it
    from running."""
    if any(m._forward_pre_hooks for m in mods[:-1]):
        return False, None
    hooks = list(mods[-1]._forward_pre_hooks.values())
    if not hooks:
        return True, None
    if len(hooks) > 1 or not isinstance(hooks[0], OnlineHadamard):
        return False, None
    t = hooks[0].transform
    if t.n != mods[-1].in_features:  # the C step transforms down's inputs
        return False, None
    return True, t.factor.contiguous()


def _router(moe) -> tuple[torch.Tensor, bool] | None:
    """A router the step reproduces: its float32 weight and whether the chosen weights are renormalised."""
    gate = getattr(moe, "gate", None)
    norm = SOFTMAX_TOPK_ROUTERS.get(type(gate).__name__)
    w = getattr(gate, "weight", None)
    if norm is None or not isinstance(w, torch.Tensor) or not w.is_floating_point() or getattr(gate, "bias", None) is not None:
        return None
    return w.detach().float().contiguous(), bool(norm if isinstance(norm, bool) else getattr(gate, norm))


def _mlp_weights(mlps: list[tuple], lm) -> tuple[list[tuple], torch.Tensor | None] | None:
    """Each ``(gate, up, down, act)`` MLP's native weights and their one online transform factor
    (a rotation's, or None), or None where an MLP cannot run in the step."""
    triples, factors = [], []
    for gate, up, down, act in mlps:
        if ACT_NAMES.get(type(act).__name__) != "silu":
            return None
        weights = _native_weights((gate, up, down), lm.dtype, lm.device)
        runnable, had = _online_factor((gate, up, down))
        if weights is None or not runnable:
            return None
        triples.append(weights)
        factors.append(had)
    if any((f is None) != (factors[0] is None) or (f is not None and not torch.equal(f, factors[0])) for f in factors):
        return None  # the step has one online transform per block
    return triples, factors[0]


def _experts(moe, lm) -> dict | None:
    """A mixture-of-experts block as ``decode.layer_struct``'s ``moe``, or None where the C step
    cannot run it: a router it does not reproduce (biases, another routing), a quantized router,
    experts not all on the native kernel with a SiLU gate, hooks (but a rotation's online transform
    on every expert's down, returned as ``"had"``), or a model not in float32 (its router would see
    the step's float32 stream, not the bf16 one the torch ops round, and a different choice of
    experts is no rounding difference).  Qwen2-MoE's shared expert and its sigmoid gate run too."""
    experts, shared, shared_gate = (getattr(moe, n, None) for n in ("experts", "shared_expert", "shared_expert_gate"))
    children = {n for n, _ in moe.named_children()}
    if lm.dtype != torch.float32 or not isinstance(experts, Experts) or children - {"shared_expert", "shared_expert_gate"} != {"gate", "experts"}:
        return None
    downs = {id(m.down_proj) for m in (*experts, *([shared] if shared is not None else []))}
    if any(m._forward_hooks or (m._forward_pre_hooks and id(m) not in downs) for m in moe.modules()):
        return None  # hooks the step would skip; a rotation's online transform on down is checked below
    router = _router(moe)
    if type(shared_gate) not in (type(None), torch.nn.Linear) or (shared_gate is not None and shared_gate.bias is not None):
        return None
    mlps = [(ex.gate_proj, ex.up_proj, ex.down_proj, getattr(ex.combine, "act", None)) for ex in experts]
    if shared is not None:
        mlps.append((shared.gate_proj, shared.up_proj, shared.down_proj, shared.act_fn))
    top_k = getattr(moe.gate, "top_k", None)
    if router is None or not isinstance(top_k, int) or not 0 < top_k <= min(native_decode.MAX_TOP_K, len(experts)):
        return None
    found = _mlp_weights(mlps, lm) if all(type(ex.combine).__name__ == "_Act" for ex in experts) else None
    if found is None:
        return None
    triples, had = found
    return {"router": router[0], "norm_topk": router[1], "top_k": top_k, "had": had,
            "experts": triples[:len(experts)], "shared": triples[len(experts)] if shared is not None else None,
            "shared_gate": None if shared_gate is None else shared_gate.weight.detach().float().reshape(-1).contiguous()}


def _norm(module, offset: float) -> torch.Tensor | None:
    """An RMSNorm's weight as the C step multiplies it: float32, Gemma's ``1 + w`` folded in."""
    if module is None:
        return None
    w = module.weight.detach().float()
    return (w + offset if offset else w).contiguous()


def _dense_mlp(moe) -> bool:
    """Whether the module in an MoE model's MLP place is a dense MLP (Qwen2/3-MoE's mlp_only_layers)."""
    return not hasattr(moe, "experts") and all(hasattr(moe, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _linears(lm, lay) -> tuple[tuple, tuple] | None:
    """``(attention modules, MLP modules)``: q, k, v, o (or q|k|v fused, None, None, o) and gate,
    up, down (or gate|up fused, None, down; none under experts), or None where the fused widths are
    not what the C step splits."""
    nq, nk = lm.n_heads * lm.head_dim, lm.n_kv * lm.head_dim
    if lay.qkv is not None and lay.qkv.out_features != nq + 2 * nk:
        return None
    attn = (lay.q, lay.k, lay.v, lay.o) if lay.qkv is None else (lay.qkv, None, None, lay.o)
    if lay.moe is not None:
        dense = _dense_mlp(lay.moe)
        return attn, (lay.moe.gate_proj, lay.moe.up_proj, lay.moe.down_proj) if dense else (None, None, None)
    if lay.gate_up is None:
        return attn, (lay.gate, lay.up, lay.down)
    if lay.gate_up.out_features != 2 * lay.down.in_features:
        return None
    return attn, (lay.gate_up, None, lay.down)


def _layer(lm, lay, kc, vc, tables) -> DecodeLayer | None:
    """One block of ``lm`` for the C step, or None where it cannot run it."""
    found = _linears(lm, lay)
    if found is None or (lay.q_norm is None) != (lay.k_norm is None):
        return None
    attn, mlp = found
    mods = tuple(m for m in attn + mlp if m is not None)
    dense = lay.moe is None or _dense_mlp(lay.moe)
    moe = None if dense else _experts(lay.moe, lm)
    if not dense and moe is None:
        return None
    act = "silu" if moe else ACT_NAMES.get(type(lay.act if lay.moe is None else lay.moe.act_fn).__name__)
    n_biased = 3 if lay.qkv is None else 1  # biases on q, k, v only
    native = _native_weights(mods, lm.dtype, lm.device, n_biased)
    if moe is None:
        runnable, had = _online_factor(mods)
    else:  # the experts' online transform (a rotation), the same for every expert
        runnable, had = not any(m._forward_pre_hooks for m in mods), moe.pop("had")
    if native is None or not runnable or act is None:
        return None
    it = iter(native)
    weights = tuple(None if m is None else next(it) for m in attn + mlp)
    off = lm.offset
    extra = {"qk_norms": (_norm(lay.q_norm, off), _norm(lay.k_norm, off)), "eps_qk": lay.eps_qk or (0.0, 0.0),
             "post_norms": (_norm(lay.post_attn_norm, off), _norm(lay.post_mlp_norm, off)),
             "eps_post": (lay.eps3 or 0.0, lay.eps4 or 0.0), "rope": tables[lay.rope], "window": lay.window or 0,
             "act": act, "moe": moe}
    biases = tuple(None if m is None or m.bias is None else m.bias.detach().float().contiguous() for m in attn[:3])
    return DecodeLayer(weights, biases, _norm(lay.attn_norm, off), _norm(lay.mlp_norm, off), lay.eps1, lay.eps2,
                       kc[0], vc[0], had, extra)


def build_plan(lm) -> DecodePlan | None:
    """A :class:`DecodePlan` over ``lm``'s (a :class:`~quantkit.runtime.lean.LeanLM`) blocks and
    cache row 0 (the one sequence it decodes), or None where the step cannot run: the kernels
    unavailable, attention not in float32, heads not shared evenly by the kv heads, an activation
    other than SiLU or tanh-GELU, a router the step does not reproduce, or a linear not on the
    native int4 kernel."""
    if not available() or lm.attn_dtype != torch.float32 or lm.n_heads % lm.n_kv:
        return None
    tables = {t: (cos.float().contiguous(), sin.float().contiguous()) for t, (cos, sin) in lm.tables.items()}
    layers = []
    for lay, kc, vc in zip(lm.layers, lm.k_cache, lm.v_cache):
        layer = _layer(lm, lay, kc, vc, tables)
        if layer is None:
            return None
        layers.append(layer)
    widths = [w.in_features for lay in layers for w in  # down's inputs: each MLP's width
              ([lay.weights[6]] if lay.extra["moe"] is None else
               [t[2] for t in lay.extra["moe"]["experts"] + [lay.extra["moe"]["shared"] or lay.extra["moe"]["experts"][0]]])]
    n_experts = max((len(lay.extra["moe"]["experts"]) for lay in layers if lay.extra["moe"]), default=0)
    dims = native_decode.decode_dims(layers[0].weights[0].in_features, lm.n_heads, lm.n_kv, lm.head_dim, max(widths),
                                     lm.capacity, lm.scaling, lm.attn_cap, n_experts)
    return DecodePlan(layers, dims, lm.cos, lm.sin)
