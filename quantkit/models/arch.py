"""Architectures as data.

A table entry says where the decoder blocks live and, inside a block, which linears share an
input and what feeds them (``prev``: a norm whose output is their input, or a linear whose
output is; AWQ and SmoothQuant fold scales into it).  Algorithms read this table and never
test a model's class.

    >>> spec = arch_for(model)           # raises QuantkitError naming what was not found
    >>> blocks = spec.blocks(model)      # nn.ModuleList of decoder layers
    >>> for g in spec.groups: print(g.prev, g.linears)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class LinearGroup:
    """Linears of a block that read the same input.

    ``prev``: the module producing that input (a norm or a linear), relative to the block, or
    ``None`` when nothing foldable feeds it.  ``prev_kind``: "norm", "layernorm" (with bias),
    "linear", or "" (none).  ``inspect``: the module whose forward covers all of ``linears``
    (AWQ runs it to measure the group's output error).
    """

    linears: tuple[str, ...]
    prev: str | None = None
    prev_kind: str = "norm"
    inspect: str | None = None
    optional: bool = False  # only some blocks have it (MoE models: experts in most blocks, a dense MLP in others)


@dataclass(frozen=True)
class DecodeSpec:
    """What the runtime's lean forward (:mod:`quantkit.runtime.lean`) needs of a pre-norm block
    ``x + p1(o(attn(rope(q(n1(x))), rope(k(.)), v(.)))``, then ``x + p2(down(act(gate(n2(x))) * up(n2(x))))``
    with RMSNorms: module names relative to a block (``rotary``: relative to the model), and the
    model types whose blocks are exactly that (``qk_norm``: Qwen3's and Gemma 3's per-head norms
    before RoPE; ``post_attn_norm``/``post_mlp_norm``: Gemma 2's and 3's sandwich norms p1, p2,
    identity when None; ``norm_offset``: Gemma's RMSNorms weigh by ``offset + w`` in float32)."""

    model_types: tuple[str, ...]
    qk_norm: tuple[str, str] | None = None
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    act: str = "mlp.act_fn"
    rotary: str = "model.rotary_emb"
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    norm_offset: float = 0.0
    qkv: str | None = None  # Phi-3: one fused q/k/v linear (q, k, v above unused), split by head counts
    gate_up: str | None = None  # Phi-3: one fused gate/up linear, its output halves (gate, up)
    moe: str | None = None  # a mixture-of-experts block: this module (router + experts) is the MLP (gate/up/down unused)


@dataclass(frozen=True)
class MoESpec:
    """Where a block's experts live and how transformers stores them fused (``layout``: "concat",
    ``gate_up_proj [E, 2I, H]``, or "gpt_oss", ``[E, H, 2I]`` interleaved with biases); ``count``:
    the config fields that may give the number of experts.  Groups naming ``{e}`` stand for every
    expert (:func:`arch_for` expands them); routers stay float."""

    experts: str = "mlp.experts"
    layout: str = "concat"
    count: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")
    # (regex, replacement) from a stored tensor name to the per-expert module's (Mixtral's checkpoints: w1/w2/w3)
    stored_names: tuple[tuple[str, str], ...] = ()
    # and back: how a float checkpoint names them, as transformers' save_pretrained does
    saved_names: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RotationSpec:
    """What a rotation of the residual stream (:mod:`quantkit.core.rotation`) needs beyond the
    groups: the linears that write the residual stream (their output rows are rotated; the
    readers are the groups fed by a norm) and those whose input gets an online Hadamard transform
    (``down_proj``: its input is not on the residual stream, so nothing offline can rotate it)."""

    writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    online: tuple[str, ...] = ("mlp.down_proj",)
    # (value projection, output projection): each head's values rotated by a Hadamard transform
    # over head_dim, undone in o_proj's input columns (offline, exact); None: a fused qkv
    values: tuple[str, str] | None = ("self_attn.v_proj", "self_attn.o_proj")
    # a mixture of experts: what reads ``moe_norm``'s output besides the groups fed by it (the
    # routers, which stay float, and every expert's gate/up, whose groups fold into no norm because
    # the router shares their input).  Names may hold "{e}" (each expert of the block); in an MoE
    # model a name the block lacks (a dense block's experts, an MoE block's dense MLP) is skipped
    moe_readers: tuple[str, ...] = ()
    moe_norm: str = "post_attention_layernorm"


_MOE_ROTATION = RotationSpec(writers=("self_attn.o_proj", "mlp.down_proj", "mlp.experts.{e}.down_proj"),
                             online=("mlp.down_proj", "mlp.experts.{e}.down_proj"),
                             moe_readers=("mlp.gate", "mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"))
# Qwen2-MoE adds a shared expert and its sigmoid gate, both reading the same input
_SHARED_EXPERT_ROTATION = RotationSpec(
    writers=_MOE_ROTATION.writers + ("mlp.shared_expert.down_proj",),
    online=_MOE_ROTATION.online + ("mlp.shared_expert.down_proj",),
    moe_readers=_MOE_ROTATION.moe_readers + ("mlp.shared_expert_gate", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"))


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    blocks_path: str
    groups: tuple[LinearGroup, ...]
    embeddings: tuple[str, ...] = ()
    final_norm: str | None = None
    lm_head: str = "lm_head"
    transposed: bool = False  # GPT-2's Conv1D stores weights as [in, out]
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    fused: dict = field(default_factory=dict)  # fused linear -> sizes of its parts (informative)
    decode: tuple[DecodeSpec, ...] = ()  # the lean runtime forward, for the model types each lists
    # the linears whose outputs meet in q @ k^T (AWQ does not clip them: their own output error
    # does not measure what clipping costs the attention scores)
    qk: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    # the residual-stream rotation (None: refused, ``no_rotation`` saying why)
    rotation: RotationSpec | None = RotationSpec()
    no_rotation: str = ""
    moe: MoESpec | None = None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model, self.blocks_path)

    def linear_names(self, block: nn.Module | None = None) -> list[str]:
        """The linears of ``block`` the table names (without a block: every name it may hold)."""
        return [name for g in (self.groups if block is None else self.groups_in(block)) for name in g.linears]

    def groups_in(self, block: nn.Module) -> tuple[LinearGroup, ...]:
        """The groups ``block`` has: every group but the optional ones it lacks."""
        return tuple(g for g in self.groups if not g.optional or all(_has(block, n) for n in g.linears))


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise QuantkitError(f"{type(root).__name__} has no module '{path}' (missing '{part}')")
        mod = getattr(mod, part)
    return mod


def module_or_none(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if not isinstance(mod, nn.Module):
            return None
    return mod


def _has(root: nn.Module, path: str) -> bool:
    return module_or_none(root, path) is not None


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path``.  A module it replaces hands over its input transforms (forward
    pre-hooks marked ``carried``, such as a rotation's online Hadamard), so a linear swapped for
    its packed runtime module still computes the same function."""
    parent, _, leaf = path.rpartition(".")
    owner = get_module(root, parent) if parent else root
    old = getattr(owner, leaf, None)
    if isinstance(old, nn.Module) and old is not new:
        for hook in list(old._forward_pre_hooks.values()):
            if getattr(hook, "carried", False):
                new.register_forward_pre_hook(hook)
    setattr(owner, leaf, new)


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_GROUPS = (
    LinearGroup(_ATTN, "input_layernorm", "norm", "self_attn"),
    LinearGroup(("self_attn.o_proj",), "self_attn.v_proj", "linear"),
    LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "norm", "mlp"),
    LinearGroup(("mlp.down_proj",), "mlp.up_proj", "linear"),
)
_GEMMA2_GROUPS = (
    LinearGroup(_ATTN, "input_layernorm", "norm", "self_attn"),
    LinearGroup(("self_attn.o_proj",), "self_attn.v_proj", "linear"),
    LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm", "norm", "mlp"),
    LinearGroup(("mlp.down_proj",), "mlp.up_proj", "linear"),
)



def _expert_groups(path: str, foldable_down: bool = True) -> tuple[LinearGroup, ...]:
    """One expert's gate/up (their input is the router's too: nothing folds into the norm) and
    down (fed by ``act(gate) * up``: AWQ folds into up's rows, except after gpt-oss's clamped GLU)."""
    return (LinearGroup((f"{path}.gate_proj", f"{path}.up_proj"), None, "", path, optional=True),
            LinearGroup((f"{path}.down_proj",), f"{path}.up_proj" if foldable_down else None, "linear" if foldable_down else "",
                        optional=True))


_EXPERTS = _expert_groups("mlp.experts.{e}")
# the dense blocks of an MoE model (DeepSeek's first_k_dense_replace, Qwen2-MoE's mlp_only_layers): no router there
_DENSE_MLP = tuple(dataclasses.replace(g, optional=True) for g in _LLAMA_GROUPS[2:])
_MOE_ATTN = _LLAMA_GROUPS[:2]
_NO_MOE_ROTATION = "rotating this MoE family's residual stream is not implemented (DeepSeek's latent attention, gpt-oss's attention sinks)"

_SANDWICH = {"mlp_norm": "pre_feedforward_layernorm", "post_attn_norm": "post_attention_layernorm",
             "post_mlp_norm": "post_feedforward_layernorm", "norm_offset": 1.0}  # Gemma 2 and 3's blocks
_LAYERNORM = "its LayerNorms subtract the mean, which a rotation does not commute with (only RMSNorm models rotate)"
_POST_NORMS = "its blocks normalize the attention and MLP outputs before the residual add, which a rotation does not commute with"

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("mixtral", ("mixtral",), "model.layers", _MOE_ATTN + _EXPERTS, ("model.embed_tokens",), "model.norm",
             rotation=_MOE_ROTATION, decode=(DecodeSpec(("mixtral",), moe="mlp"),),
             moe=MoESpec(stored_names=((r"\.block_sparse_moe\.", ".mlp."), (r"(experts\.\d+)\.w1\.", r"\1.gate_proj."),
                                       (r"(experts\.\d+)\.w3\.", r"\1.up_proj."), (r"(experts\.\d+)\.w2\.", r"\1.down_proj.")),
                         saved_names=((r"\.mlp\.(gate|experts)\.", r".block_sparse_moe.\1."), (r"(experts\.\d+)\.gate_proj\.", r"\1.w1."),
                                      (r"(experts\.\d+)\.up_proj\.", r"\1.w3."), (r"(experts\.\d+)\.down_proj\.", r"\1.w2.")))),
    ArchSpec("qwen_moe", ("qwen3_moe", "olmoe"), "model.layers", _MOE_ATTN + _DENSE_MLP + _EXPERTS, ("model.embed_tokens",), "model.norm",
             rotation=_MOE_ROTATION, moe=MoESpec(),
             # OLMoE normalizes q and k over all heads at once: not the lean forward's per-head norms
             decode=(DecodeSpec(("qwen3_moe",), qk_norm=("self_attn.q_norm", "self_attn.k_norm"), moe="mlp"),)),
    ArchSpec("qwen2_moe", ("qwen2_moe",), "model.layers", _MOE_ATTN + _DENSE_MLP + _expert_groups("mlp.shared_expert") + _EXPERTS,
             ("model.embed_tokens",), "model.norm", rotation=_SHARED_EXPERT_ROTATION, moe=MoESpec(),
             decode=(DecodeSpec(("qwen2_moe",), moe="mlp"),)),  # the shared expert and its sigmoid gate run inside mlp
    ArchSpec("gpt_oss", ("gpt_oss",), "model.layers", _MOE_ATTN + _expert_groups("mlp.experts.{e}", foldable_down=False),
             ("model.embed_tokens",), "model.norm", rotation=None, no_rotation=_NO_MOE_ROTATION,
             moe=MoESpec(layout="gpt_oss")),  # attention sinks: not lean
    ArchSpec(
        "deepseek_v3", ("deepseek_v3",), "model.layers",
        (
            LinearGroup(("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), "input_layernorm", "norm"),
            LinearGroup(("self_attn.q_b_proj",), "self_attn.q_a_layernorm", "norm"),
            LinearGroup(("self_attn.kv_b_proj",), "self_attn.kv_a_layernorm", "norm"),
            LinearGroup(("self_attn.o_proj",), None, ""),
        ) + _DENSE_MLP + _expert_groups("mlp.shared_experts") + _EXPERTS,
        ("model.embed_tokens",), "model.norm", qk=("self_attn.q_b_proj", "self_attn.kv_b_proj"),
        rotation=None, no_rotation=_NO_MOE_ROTATION, moe=MoESpec(),
    ),
    ArchSpec("llama", ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite"), "model.layers", _LLAMA_GROUPS,
             ("model.embed_tokens",), "model.norm",
             # SmolLM3 skips RoPE in some layers and Granite scales residuals and logits: not lean
             decode=(DecodeSpec(("llama", "mistral", "qwen2")),
                     DecodeSpec(("qwen3",), qk_norm=("self_attn.q_norm", "self_attn.k_norm")))),
    ArchSpec("gemma", ("gemma",), "model.layers", _LLAMA_GROUPS, ("model.embed_tokens",), "model.norm", norm_offset=1.0,
             decode=(DecodeSpec(("gemma",), norm_offset=1.0),)),
    ArchSpec("gemma2", ("gemma2", "gemma3_text"), "model.layers", _GEMMA2_GROUPS, ("model.embed_tokens",), "model.norm",
             norm_offset=1.0, rotation=None, no_rotation=_POST_NORMS,
             decode=(DecodeSpec(("gemma2",), **_SANDWICH), DecodeSpec(("gemma3_text",), qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
                                                                      **_SANDWICH))),
    ArchSpec(
        "phi3", ("phi3",), "model.layers",
        (
            LinearGroup(("self_attn.qkv_proj",), "input_layernorm", "norm", "self_attn"),
            LinearGroup(("self_attn.o_proj",), None, ""),  # fed by a slice of qkv_proj: nothing to fold into
            LinearGroup(("mlp.gate_up_proj",), "post_attention_layernorm", "norm", "mlp"),
            LinearGroup(("mlp.down_proj",), None, ""),  # fed by act(gate) * up of a fused linear
        ),
        ("model.embed_tokens",), "model.norm", qk=("self_attn.qkv_proj",), rotation=RotationSpec(values=None),
        decode=(DecodeSpec(("phi3",), qkv="self_attn.qkv_proj", gate_up="mlp.gate_up_proj", act="mlp.activation_fn"),),
    ),
    ArchSpec(
        "opt", ("opt",), "model.decoder.layers",
        (
            LinearGroup(_ATTN, "self_attn_layer_norm", "layernorm", "self_attn"),
            LinearGroup(("self_attn.out_proj",), "self_attn.v_proj", "linear"),
            LinearGroup(("fc1",), "final_layer_norm", "layernorm"),
            LinearGroup(("fc2",), "fc1", "linear"),
        ),
        ("model.decoder.embed_tokens", "model.decoder.embed_positions"), "model.decoder.final_layer_norm",
        rotation=None, no_rotation=_LAYERNORM,
    ),
    ArchSpec(
        "gpt2", ("gpt2",), "transformer.h",
        (
            LinearGroup(("attn.c_attn",), "ln_1", "layernorm", "attn"),
            LinearGroup(("attn.c_proj",), None, ""),
            LinearGroup(("mlp.c_fc",), "ln_2", "layernorm"),
            LinearGroup(("mlp.c_proj",), None, ""),  # fed through GELU: not foldable
        ),
        ("transformer.wte", "transformer.wpe"), "transformer.ln_f", transposed=True, qk=("attn.c_attn",),
        rotation=None, no_rotation=_LAYERNORM,
    ),
    ArchSpec(
        "gpt_neox", ("gpt_neox",), "gpt_neox.layers",
        (
            LinearGroup(("attention.query_key_value",), "input_layernorm", "layernorm", "attention"),
            LinearGroup(("attention.dense",), None, ""),
            LinearGroup(("mlp.dense_h_to_4h",), "post_attention_layernorm", "layernorm"),
            LinearGroup(("mlp.dense_4h_to_h",), None, ""),
        ),
        ("gpt_neox.embed_in",), "gpt_neox.final_layer_norm", lm_head="embed_out",
        qk=("attention.query_key_value",), rotation=None, no_rotation=_LAYERNORM,
    ),
)


def find_arch(model_type: str | None) -> ArchSpec | None:
    """The table entry for a ``config.model_type`` (``None`` when the table has none): the one lookup."""
    return next((spec for spec in ARCHITECTURES if model_type in spec.model_types), None)


def arch_for(model: nn.Module) -> ArchSpec:
    """The table entry for ``model`` (by ``config.model_type``), checked against the model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = find_arch(model_type)
    if spec is None:
        known = sorted(t for s in ARCHITECTURES for t in s.model_types)
        raise QuantkitError(f"unsupported architecture: model_type {model_type!r} is not in quantkit's table (known: {', '.join(known)})")
    blocks = spec.blocks(model)
    if len(blocks) == 0:
        raise QuantkitError(f"{model_type}: '{spec.blocks_path}' holds no decoder blocks")
    if spec.moe is not None:
        spec = expand_experts(spec, model.config)
    for i, block in enumerate(blocks if spec.moe is not None else blocks[:1]):
        for g in spec.groups:
            for name in g.linears if not g.optional else ():
                get_module(block, name)
        if spec.moe is not None and hasattr(getattr(module_or_none(block, spec.moe.experts), "gate_up_proj", None), "shape"):
            raise QuantkitError(f"{model_type}: block {i}'s experts are transformers' fused module; "
                                "quantkit.models.moe.unfuse_experts(model) gives each expert its linears")
        if spec.moe is not None and not any(g.optional for g in spec.groups_in(block)):
            raise QuantkitError(f"{model_type}: block {i} has neither experts nor a dense MLP quantkit's table knows")
    return spec


def expand_experts(spec: ArchSpec, config) -> ArchSpec:
    """``spec`` with each group naming ``{e}`` repeated for every expert of the model."""
    n = next((v for a in spec.moe.count if isinstance(v := getattr(config, a, None), int) and v > 0), None)
    if n is None:
        raise QuantkitError(f"{config.model_type}: the config gives no number of experts ({' / '.join(spec.moe.count)})")
    groups = []
    for g in spec.groups:
        if "{e}" not in "".join(g.linears):
            groups.append(g)
            continue
        for e in range(n):
            fill = lambda s, e=e: s.replace("{e}", str(e)) if s else s  # noqa: E731
            groups.append(dataclasses.replace(g, linears=tuple(fill(x) for x in g.linears), prev=fill(g.prev), inspect=fill(g.inspect)))
    return dataclasses.replace(spec, groups=tuple(groups))


def weight_out_in(mod: nn.Module, transposed: bool) -> torch.Tensor:
    """A view of a linear's weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
    return mod.weight.data.t() if transposed else mod.weight.data


def untie_head(model: nn.Module, arch: ArchSpec) -> bool:
    """Give the output head its own weight if it shares the input embedding's, and record that
    in the config (a checkpoint then says ``tie_word_embeddings: false``).  The embedding stays
    float; returns whether the head was tied."""
    head = get_module(model, arch.lm_head)
    shared = {p.data_ptr() for n, p in model.named_parameters(remove_duplicate=False)
              if not n.startswith(arch.lm_head + ".")}
    tied = head.weight.data_ptr() in shared
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    return tied
