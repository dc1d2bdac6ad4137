"""Export to GGUF, the single-file format llama.cpp runs.

quantkit's packed groups are written as ggml block types *exactly* where the grid fits (the
encoders and their table are :mod:`quantkit.pack.ggml`: 4/5-bit sym -> Q4_0/Q5_0, 4/5-bit asym
-> Q4_1/Q5_1, 8-bit sym -> Q8_0).  A group of 64 (or any multiple of 32, or per-channel when
``in_features % 32 == 0``) repeats its scale over its 32-weight blocks.  What has no exact block
type (2/3/6/7 bits, asymmetric 8-bit, groups that are not a multiple of 32, act-order without
static groups) is refused unless ``requant`` names a fallback type.
Float matrices (embeddings, layers left in float, an untied ``lm_head``) are written as F16 or
F32, vectors (norms, biases) as F32.

Llama-family models are laid out as llama.cpp's converter does: tensor names from the ``gguf``
package's own name table, Q/K output rows permuted from Hugging Face's rotate-half RoPE pairing
to llama.cpp's interleaved pairs (scales and zeros travel with their rows: the permutation is
applied to whole encoded rows), the hyperparameters under ``llama.*``, and the tokenizer
(``"llama"`` SentencePiece-style or ``"gpt2"`` byte-level BPE) under ``tokenizer.ggml.*``.
Qwen3 and Qwen3-MoE keep their rows (llama.cpp's ``qwen3``/``qwen3moe`` graphs rotate halves, as
Hugging Face does).  A mixture of experts (Mixtral as ``llama``, Qwen3-MoE) writes each block's
experts stacked into one 3-D tensor per projection (``ffn_gate_exps``, ``ffn_up_exps``,
``ffn_down_exps``: ``[experts, out, in]``, every expert encoded alike), the router as
``ffn_gate_inp`` (float) and the expert counts.

    >>> export_gguf("out/smollm2-gptq-w4g32", "smollm2-w4.gguf")      # -> Q4_0 linears
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantkit.checkpoint.formats import load_model
from quantkit.checkpoint.gguf_tokenizer import write_tokenizer
from quantkit.checkpoint.output import atomic_output_file, check_output
from quantkit.checkpoint.packed import check_exportable, unique_state_dict
from quantkit.models.paths import read_quantization_config
from quantkit.errors import QuantkitError
from quantkit.pack.ggml import BLOCK, BLOCK_TYPES, BlockType, DoesNotFit, encode_grid
from quantkit.runtime.qlinear import QuantLinear


# ---- architectures as data ----------------------------------------------------------------
@dataclass(frozen=True)
class GGUFArch:
    """How one family is laid out for llama.cpp: its ``general.architecture`` name, the
    ``gguf`` package's tensor-name table to use, and whether Q/K rows are permuted
    (llama.cpp's ``llama`` graph applies RoPE to interleaved pairs, HF Llama to halves)."""

    name: str
    model_types: tuple[str, ...]
    permute_qk: bool


GGUF_ARCHS = (GGUFArch("llama", ("llama", "mistral", "mixtral"), permute_qk=True),
              GGUFArch("qwen3", ("qwen3",), permute_qk=False),
              GGUFArch("qwen3moe", ("qwen3_moe",), permute_qk=False))


def gguf_arch_for(config) -> GGUFArch:
    model_type = getattr(config, "model_type", None)
    for spec in GGUF_ARCHS:
        if model_type in spec.model_types:
            return spec
    known = sorted(t for s in GGUF_ARCHS for t in s.model_types)
    raise QuantkitError(f"GGUF export supports model_type {', '.join(known)}; this model is {model_type!r}")


# ---- quantized linears -> ggml blocks ---------------------------------------------------
def quant_linear_blocks(mod) -> tuple[torch.Tensor, BlockType]:
    """Encode a :class:`~quantkit.runtime.qlinear.QuantLinear` as rows of ggml blocks, or raise
    :class:`DoesNotFit` saying why its grid has no exact ggml type."""
    in_f = mod.in_features
    if in_f % BLOCK:
        raise DoesNotFit(f"{in_f} input features are not a multiple of ggml's {BLOCK}-weight block")
    g = mod.group_map().long().reshape(-1, BLOCK)  # [in] -> [n_blocks, 32]
    if not bool((g == g[:, :1]).all()):
        if mod.g_idx is not None and not torch.equal(mod.g_idx.long(), torch.arange(in_f) // mod.group_size):
            raise DoesNotFit("act-order without static groups: a 32-weight block mixes several groups")
        raise DoesNotFit(f"group size {mod.group_size} is not a multiple of ggml's {BLOCK}-weight block")
    g = g[:, 0]
    d = mod.scales[:, g]  # [out, n_groups] -> [out, n_blocks] (fp16, as stored)
    z = mod.zero_points()[:, g]
    return encode_grid(mod.codes(), d, z, mod.bits)


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order that turns HF Llama's rotate-half Q/K rows (pairs ``(i, i + d/2)`` of each head)
    into llama.cpp's interleaved ones (pairs ``(2i, 2i+1)``): ``W_gguf = W_hf[perm]``."""
    head_dim = rows // n_head
    return torch.arange(rows).reshape(n_head, 2, head_dim // 2).transpose(1, 2).reshape(-1)


# ---- tensors ----------------------------------------------------------------------------
FLOAT_TYPES = ("f16", "f32")
REQUANT_TYPES = ("f32", "f16", "q8_0")


@dataclass
class GGUFTensor:
    name: str
    data: np.ndarray  # float32/float16 values, or uint8 encoded block rows
    qtype: str  # "F32", "F16", or a block type name


def _float_tensor(name: str, w: torch.Tensor, float_type: str) -> GGUFTensor:
    w = w.detach().float()
    if w.dim() == 1 or float_type == "f32" or w.abs().max() > 65504:
        return GGUFTensor(name, w.numpy().astype(np.float32), "F32")
    return GGUFTensor(name, w.numpy().astype(np.float16), "F16")


def _requantized(name: str, w: torch.Tensor, requant: str) -> GGUFTensor:
    if requant in FLOAT_TYPES:
        return _float_tensor(name, w, requant)
    from gguf import GGMLQuantizationType, quants

    if w.shape[-1] % BLOCK:
        raise QuantkitError(f"{name}: cannot requantize to Q8_0, {w.shape[-1]} input features are not a multiple of {BLOCK}; "
                            "use --requant f16 or f32")
    return GGUFTensor(name, quants.quantize(w.float().numpy(), GGMLQuantizationType.Q8_0), "Q8_0")


@dataclass(frozen=True)
class _Layout:
    """Where a Hugging Face tensor goes in the GGUF file: its name in the ``gguf`` package's table,
    and the RoPE row permutation of Q/K (weights, biases and encoded block rows alike)."""

    arch: GGUFArch
    names: object  # gguf.TensorNameMap
    n_head: int
    n_kv: int

    @classmethod
    def of(cls, config) -> _Layout:
        import gguf

        arch = gguf_arch_for(config)
        n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(arch, gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], config.num_hidden_layers), n_head, n_kv)

    def name(self, hf_name: str) -> str:
        out = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if out is None:
            raise QuantkitError(f"no GGUF {self.arch.name} tensor for {hf_name}")
        return out

    def permute(self, hf_name: str, t: torch.Tensor) -> torch.Tensor:
        if self.arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return t[rope_permutation(t.shape[0], self.n_head)]
        if self.arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return t[rope_permutation(t.shape[0], self.n_kv)]
        return t


def _refuse_other_runtime_modules(modules: dict[str, nn.Module], quant_linear: type) -> None:
    for name, mod in modules.items():
        if type(mod).__module__.startswith("quantkit.runtime") and not isinstance(mod, quant_linear):
            raise QuantkitError(f"{name} is a {type(mod).__name__} module; GGUF export writes weight-only quantized "
                                "(QuantLinear) and float linears")


def _quant_linear_tensors(layout: _Layout, mod_name: str, mod, leaf: str, t: torch.Tensor,
                          requant: str | None) -> list[GGUFTensor]:
    """The GGUF tensors of one state-dict entry ``leaf`` of a QuantLinear: its encoded weight rows
    (from ``qweight``; scales/qzeros/g_idx are encoded with them) and its bias."""
    if leaf != "qweight":
        key = f"{mod_name}.{leaf}"
        return [_float_tensor(layout.name(key), layout.permute(key, t), "f32")] if leaf == "bias" else []
    wkey = f"{mod_name}.weight"
    try:
        rows, btype = quant_linear_blocks(mod)
    except DoesNotFit as e:
        if requant is None:
            raise QuantkitError(f"{mod_name} cannot be written to GGUF exactly: {e} "
                                f"(pass --requant {{{','.join(REQUANT_TYPES)}}} to convert such layers)") from None
        return [_requantized(layout.name(wkey), layout.permute(wkey, mod.dequantized_weight()), requant)]
    return [GGUFTensor(layout.name(wkey), layout.permute(wkey, rows).numpy(), btype.name)]


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def gguf_tensors(model: nn.Module, float_type: str = "f16", requant: str | None = None) -> list[GGUFTensor]:
    """Every tensor of ``model`` under its GGUF name, Q/K rows permuted, quantized linears encoded,
    each block's experts stacked per projection."""
    layout = _Layout.of(model.config)
    modules = dict(model.named_modules())
    _refuse_other_runtime_modules(modules, QuantLinear)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors, experts = [], {}
    for key, t in unique_state_dict(model).items():
        mod_name, _, leaf = key.rpartition(".")
        mod = modules.get(mod_name)
        if tied and key == "lm_head.weight" and not isinstance(mod, QuantLinear):
            continue  # llama.cpp reads token_embd for the output when output.weight is absent
        # an expert's tensors go under the block's merged name (no index), stacked below
        m = _EXPERT.search(key)
        merged = _EXPERT.sub(".experts.", mod_name) if m else mod_name
        if isinstance(mod, QuantLinear):
            found = _quant_linear_tensors(layout, merged, mod, leaf, t, requant)
        elif not t.is_floating_point():
            raise QuantkitError(f"{key} is a {t.dtype} tensor with no place in a GGUF file")
        else:
            found = [_float_tensor(layout.name(f"{merged}.{leaf}"), layout.permute(key, t), float_type)]
        if m:
            for g in found:
                experts.setdefault(g.name, []).append((int(m.group(1)), g))
        else:
            tensors += found
    return tensors + [_stacked(name, parts) for name, parts in experts.items()]


def _stacked(name: str, parts: list[tuple[int, GGUFTensor]]) -> GGUFTensor:
    """One block's experts of one projection as a ``[experts, ...]`` tensor, in expert order."""
    parts = sorted(parts, key=lambda p: p[0])
    types = {g.qtype for _, g in parts}
    if len(types) > 1 or [i for i, _ in parts] != list(range(len(parts))):
        raise QuantkitError(f"{name}: llama.cpp stacks a block's experts into one tensor of one type; these are "
                            f"{', '.join(sorted(types))} (quantize every expert alike; float experts: --float-type f32)")
    return GGUFTensor(name, np.stack([g.data for _, g in parts]), parts[0][1].qtype)


# ---- metadata -----------------------------------------------------------------------------
def _rope(config) -> tuple[float, dict]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def write_hparams(writer, config, file_type: int, name: str) -> None:
    import gguf

    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    theta, rope = _rope(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head or config.model_type in ("qwen3", "qwen3_moe"):
        writer.add_key_length(head_dim)  # Qwen3's readers take the head size from here, never from the widths
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in ("default", None):
        raise QuantkitError(f"RoPE scaling {rope_type!r} is not supported by the GGUF export yet (default and linear are)")
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    _write_experts(writer, config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _check_experts(config) -> None:
    """Refuse a Qwen3-MoE llama.cpp's ``qwen3moe`` graph would compute differently: it renormalises
    the chosen experts' weights and has experts in every block."""
    if config.model_type != "qwen3_moe":
        return
    if not getattr(config, "norm_topk_prob", True):
        raise QuantkitError("llama.cpp's qwen3moe renormalises the chosen experts' weights; this model does not "
                            "(norm_topk_prob: false), so its GGUF would compute something else")
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise QuantkitError("llama.cpp's qwen3moe has experts in every block; this model has dense ones "
                            "(mlp_only_layers, decoder_sparse_step)")


def _write_experts(writer, config) -> None:
    """A mixture of experts' counts (Mixtral: ``num_local_experts``; Qwen3-MoE: ``num_experts`` and
    each expert's width)."""
    count = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not count:
        return
    if config.model_type == "qwen3_moe":
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_count(count)
    writer.add_expert_used_count(config.num_experts_per_tok)


# ---- the export ---------------------------------------------------------------------------
def _check_arguments(src: Path, out: Path, float_type: str, requant: str | None, overwrite: bool) -> None:
    if float_type not in FLOAT_TYPES:
        raise QuantkitError(f"float type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    if requant is not None and requant not in REQUANT_TYPES:
        raise QuantkitError(f"--requant must be one of {', '.join(REQUANT_TYPES)}, got {requant!r}")
    if not src.is_dir():
        raise QuantkitError(f"{src} is not a checkpoint directory (GGUF export reads a local model directory)")
    check_output(out, overwrite, inputs=(src,), kind="file")
    check_exportable(read_quantization_config(src), src, "llama.cpp")


def _file_type(counts: Counter) -> int:
    """``general.file_type``: the block type most tensors use, else F16 if any tensor is, else F32."""
    import gguf

    blocks = [(counts[b.name], getattr(gguf.LlamaFileType, f"MOSTLY_{b.name}")) for b in BLOCK_TYPES if counts[b.name]]
    if blocks:
        return max(blocks)[1]
    return gguf.LlamaFileType.MOSTLY_F16 if counts["F16"] else gguf.LlamaFileType.ALL_F32


def _write_file(path: Path, arch: GGUFArch, config, src: Path, tensors: list[GGUFTensor], ftype: int,
                tokenizer_pre: str | None) -> str:
    """Header, metadata, tokenizer and tensors into ``path``; returns the tokenizer model name."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch.name)
    write_hparams(writer, config, ftype, src.name)
    tok_model = write_tokenizer(writer, src, config.vocab_size, tokenizer_pre)
    for t in tensors:
        if t.qtype in ("F32", "F16"):
            writer.add_tensor(t.name, t.data)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=gguf.GGMLQuantizationType[t.qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tok_model


def export_gguf(src: str | Path, out: str | Path, *, float_type: str = "f16", requant: str | None = None,
                tokenizer_pre: str | None = None, overwrite: bool = False) -> dict:
    """Write ``src`` (a quantkit packed checkpoint, a GPTQ/AWQ-format checkpoint or a float
    model directory) as one GGUF file at ``out``, atomically. Returns a summary:
    ``{"output", "bytes", "tensors": {type: count}, "tokenizer"}``."""
    import logging


    src, out = Path(src), Path(out)
    _check_arguments(src, out, float_type, requant, overwrite)
    model, _ = load_model(str(src), with_tokenizer=False)
    arch = gguf_arch_for(model.config)
    _check_experts(model.config)
    with torch.no_grad():
        tensors = gguf_tensors(model, float_type, requant)
    counts = Counter(t.qtype for t in tensors)
    ftype = _file_type(counts)

    logging.getLogger("gguf").setLevel(logging.ERROR)
    with atomic_output_file(out, overwrite, inputs=(src,)) as tmp:
        tok_model = _write_file(tmp, arch, model.config, src, tensors, ftype, tokenizer_pre)
    return {"output": str(out), "bytes": out.stat().st_size, "tensors": dict(sorted(counts.items())), "tokenizer": tok_model}
