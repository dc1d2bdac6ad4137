"""Export to GGUF, the single-file format llama.cpp runs.

quantkit's packed groups are written as ggml block types *exactly* where the grid fits: every
ggml type used here holds 32 consecutive weights of a row with one fp16 scale ``d``:

============  =====================  ==========================================
quantkit      ggml type              weight of code ``q``
============  =====================  ==========================================
4-bit sym     Q4_0                   ``d * (q - 8)``      (quantkit's zero is 8)
4-bit asym    Q4_1                   ``d * q + m``,  ``m = fp16(-z * d)``
5-bit sym     Q5_0                   ``d * (q - 16)``
5-bit asym    Q5_1                   ``d * q + m``
8-bit sym     Q8_0                   ``d * (q - 128)``    (stored as int8)
============  =====================  ==========================================

A group of 64 (or any multiple of 32, or per-channel when ``in_features % 32 == 0``) repeats
its scale over its 32-weight blocks, so the symmetric types reproduce quantkit's dequantized
weights bit for bit; the asymmetric ones differ only by the fp16 rounding of the offset ``m``.
What has no exact block type (2/3/6/7 bits, asymmetric 8-bit, groups that are not a multiple of
32, act-order without static groups) is refused unless ``requant`` names a fallback type.
Float matrices (embeddings, layers left in float, an untied ``lm_head``) are written as F16 or
F32, vectors (norms, biases) as F32.

Llama-family models are laid out as llama.cpp's converter does: tensor names from the ``gguf``
package's own name table, Q/K output rows permuted from Hugging Face's rotate-half RoPE pairing
to llama.cpp's interleaved pairs (scales and zeros travel with their rows: the permutation is
applied to whole encoded rows), the hyperparameters under ``llama.*``, and the tokenizer
(``"llama"`` SentencePiece-style or ``"gpt2"`` byte-level BPE) under ``tokenizer.ggml.*``.

    >>> export_gguf("out/smollm2-gptq-w4g32", "smollm2-w4.gguf")      # -> Q4_0 linears
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantkit.errors import QuantkitError

BLOCK = 32  # weights per block in every ggml type written here


# ---- architectures as data ----------------------------------------------------------------
@dataclass(frozen=True)
class GGUFArch:
    """How one family is laid out for llama.cpp: its ``general.architecture`` name, the
    ``gguf`` package's tensor-name table to use, and whether Q/K rows are permuted
    (llama.cpp's ``llama`` graph applies RoPE to interleaved pairs, HF Llama to halves)."""

    name: str
    model_types: tuple[str, ...]
    permute_qk: bool


GGUF_ARCHS = (GGUFArch("llama", ("llama", "mistral"), permute_qk=True),)


def gguf_arch_for(config) -> GGUFArch:
    model_type = getattr(config, "model_type", None)
    for spec in GGUF_ARCHS:
        if model_type in spec.model_types:
            return spec
    known = sorted(t for s in GGUF_ARCHS for t in s.model_types)
    raise QuantkitError(f"GGUF export supports model_type {', '.join(known)}; this model is {model_type!r}")


# ---- block encodings --------------------------------------------------------------------
@dataclass(frozen=True)
class BlockType:
    """A ggml block type and the quantkit grid it holds exactly."""

    name: str
    bits: int
    sym: bool  # sym: x = d * (q - 2**(bits-1)); asym: x = d * q + m
    file_type: int  # gguf.LlamaFileType of a file mostly in this type


def _block_types() -> tuple[BlockType, ...]:
    from gguf import LlamaFileType as F

    return (BlockType("Q4_0", 4, True, F.MOSTLY_Q4_0), BlockType("Q4_1", 4, False, F.MOSTLY_Q4_1),
            BlockType("Q5_0", 5, True, F.MOSTLY_Q5_0), BlockType("Q5_1", 5, False, F.MOSTLY_Q5_1),
            BlockType("Q8_0", 8, True, F.MOSTLY_Q8_0))


def block_type_for(bits: int, sym: bool) -> BlockType | None:
    return next((t for t in _block_types() if t.bits == bits and t.sym == sym), None)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` -> ``[..., n, 2]`` little-endian bytes of fp16 values."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def encode_blocks(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, btype: BlockType) -> torch.Tensor:
    """Rows of ggml blocks: ``codes [out, in]`` (in ``[0, 2**bits)``), per-block scales
    ``d [out, in/32]`` and, for the asymmetric types, offsets ``m [out, in/32]`` ->
    ``uint8 [out, in/32 * type_size]``.

    Block layouts (ggml-common.h): ``d`` (fp16) [, ``m`` (fp16)] [, ``qh`` (uint32: bit j is
    bit 4 of weight j, 5-bit types)], then ``qs``: 4/5-bit types put weight j in the low nibble
    of byte j and weight j+16 in its high nibble; Q8_0 stores ``q - 128`` as 32 int8.
    """
    out_f, in_f = codes.shape
    q = codes.to(torch.int64).reshape(out_f, in_f // BLOCK, BLOCK)  # [out, in] -> [out, n_blocks, 32]
    parts = [_f16_bytes(d)]
    if not btype.sym:
        parts.append(_f16_bytes(m))
    if btype.bits == 8:
        parts.append((q - 128).to(torch.int8).view(torch.uint8))
    else:
        if btype.bits == 5:
            qh = ((q >> 4) & 1) << torch.arange(BLOCK, dtype=torch.int64)  # [out, n_blocks, 32]
            word = qh.sum(-1, keepdim=True)  # [out, n_blocks, 1]
            parts.append((word >> (8 * torch.arange(4, dtype=torch.int64))) & 0xFF)
        lo = q & 0xF
        parts.append(lo[..., : BLOCK // 2] | (lo[..., BLOCK // 2:] << 4))
    return torch.cat([p.to(torch.uint8) for p in parts], -1).reshape(out_f, -1)


class DoesNotFit(QuantkitError):
    """A quantized linear whose grid no ggml block type holds exactly."""


def quant_linear_blocks(mod) -> tuple[torch.Tensor, BlockType]:
    """Encode a :class:`~quantkit.runtime.qlinear.QuantLinear` as rows of ggml blocks, or raise
    :class:`DoesNotFit` saying why its grid has no exact ggml type."""
    bits, (out_f, in_f) = mod.bits, (mod.out_features, mod.in_features)
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
    sym = bool((z == 2 ** (bits - 1)).all())  # GPTQ/AWQ imports keep explicit zeros; 2**(bits-1) everywhere is symmetric
    btype = block_type_for(bits, sym)
    if btype is None:
        have = ", ".join(f"{t.bits}-bit {'sym' if t.sym else 'asym'} ({t.name})" for t in _block_types())
        raise DoesNotFit(f"{bits}-bit {'symmetric' if sym else 'asymmetric'} grids have no exact ggml block type (exact: {have})")
    m = None
    if not sym:
        m = (-z * d.float()).to(torch.float16)
        if not torch.isfinite(m).all():
            raise DoesNotFit("a group offset -z*s overflows fp16")
    return encode_blocks(mod.codes(), d, m, btype), btype


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


def gguf_tensors(model: nn.Module, float_type: str = "f16", requant: str | None = None) -> list[GGUFTensor]:
    """Every tensor of ``model`` under its GGUF name, Q/K rows permuted, quantized linears encoded."""
    import gguf

    from quantkit.checkpoint.packed import unique_state_dict
    from quantkit.runtime.qlinear import QuantLinear

    config = model.config
    arch = gguf_arch_for(config)
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], config.num_hidden_layers)
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        if type(mod).__module__.startswith("quantkit.runtime") and not isinstance(mod, QuantLinear):
            raise QuantkitError(f"{name} is a {type(mod).__name__} module; GGUF export writes weight-only quantized "
                                "(QuantLinear) and float linears")

    def permute(hf_name: str, t: torch.Tensor) -> torch.Tensor:
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return t[rope_permutation(t.shape[0], n_head)]
        if arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return t[rope_permutation(t.shape[0], n_kv)]
        return t

    def gguf_name(hf_name: str) -> str:
        out = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if out is None:
            raise QuantkitError(f"no GGUF {arch.name} tensor for {hf_name}")
        return out

    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = []
    for key, t in unique_state_dict(model).items():
        mod_name, _, leaf = key.rpartition(".")
        mod = modules.get(mod_name)
        if tied and key == "lm_head.weight" and not isinstance(mod, QuantLinear):
            continue  # llama.cpp reads token_embd for the output when output.weight is absent
        if isinstance(mod, QuantLinear):
            if leaf != "qweight":
                if leaf == "bias":
                    tensors.append(_float_tensor(gguf_name(key), permute(key, t), "f32"))
                continue  # scales/qzeros/g_idx are encoded with qweight
            wkey = f"{mod_name}.weight"
            try:
                rows, btype = quant_linear_blocks(mod)
            except DoesNotFit as e:
                if requant is None:
                    raise QuantkitError(f"{mod_name} cannot be written to GGUF exactly: {e} "
                                        f"(pass --requant {{{','.join(REQUANT_TYPES)}}} to convert such layers)") from None
                tensors.append(_requantized(gguf_name(wkey), permute(wkey, mod.dequantized_weight()), requant))
                continue
            tensors.append(GGUFTensor(gguf_name(wkey), permute(wkey, rows).numpy(), btype.name))
            continue
        if not t.is_floating_point():
            raise QuantkitError(f"{key} is a {t.dtype} tensor with no place in a GGUF file")
        tensors.append(_float_tensor(gguf_name(key), permute(key, t), float_type))
    return tensors


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
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in ("default", None):
        raise QuantkitError(f"RoPE scaling {rope_type!r} is not supported by the GGUF export yet (default and linear are)")
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---- tokenizer ----------------------------------------------------------------------------
def _flatten(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in node else "normalizers"
        return [x for child in node.get(key, []) for x in _flatten(child)]
    return [node]


def bpe_pre_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, recognised from tokenizer.json's
    structure (llama.cpp itself hashes the tokenization of a probe text); ``"default"`` if unknown."""
    steps = _flatten(tokenizer_json.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split" and "ByteLevel" in kinds:
        pattern = steps[0].get("pattern", {}).get("Regex", "")
        if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pattern:
            return "llama-bpe" if r"\p{N}{1,3}" in pattern else "qwen2"
    return "default"


def _spm_like(tokenizer_json: dict) -> bool:
    """A SentencePiece BPE model converted to tokenizer.json (Llama-2, stories260K): byte
    fallback and a normalizer that turns spaces into U+2581."""
    model = tokenizer_json.get("model", {})
    norms = _flatten(tokenizer_json.get("normalizer"))
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and any(
        n.get("type") in ("Prepend", "Replace") and "\u2581" in json.dumps(n, ensure_ascii=False) for n in norms)


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def write_tokenizer(writer, directory: Path, vocab_size: int, pre: str | None = None) -> str:
    """``tokenizer.ggml.*`` from the checkpoint's tokenizer files; returns the tokenizer model name."""
    import gguf

    tj_path = directory / "tokenizer.json"
    sp_path = directory / "tokenizer.model"
    tj = json.loads(tj_path.read_text()) if tj_path.is_file() else None
    T = gguf.TokenType
    tokens: list[str | bytes] = []
    scores: list[float] | None = None
    if sp_path.is_file():  # the SentencePiece model itself: its own pieces, scores and types
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(sp_path))
        scores, types = [], []
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i).encode("utf-8"))
            scores.append(sp.get_score(i))
            types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                         T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL)
        model_name, space_prefix = "llama", True
    elif tj is not None and tj.get("model", {}).get("type") == "BPE":
        vocab = dict(tj["model"]["vocab"])
        added = {a["id"]: a for a in tj.get("added_tokens", [])}
        for a in added.values():
            vocab.setdefault(a["content"], a["id"])
        by_id = {i: t for t, i in vocab.items()}
        spm_like = _spm_like(tj)
        unk = tj["model"].get("unk_token")
        merges = _merge_pairs(tj["model"].get("merges", []))
        rank = {}
        for r, (a, b) in enumerate(merges):
            rank.setdefault(a + b, r)
        types = []
        for i in range(len(by_id)):
            t = by_id.get(i)
            if t is None:
                raise QuantkitError(f"{tj_path}: token id {i} is missing from the vocabulary")
            tokens.append(t)
            if spm_like and t == unk:
                types.append(T.UNKNOWN)
            elif i in added:
                types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
            elif spm_like and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types.append(T.BYTE)
            else:
                types.append(T.NORMAL)
        if spm_like:
            # llama.cpp's SentencePiece tokenizer merges the highest-scoring pair first: the
            # merge rank orders pieces as SentencePiece's scores did
            scores = [-float(rank[t]) if t in rank else -float(len(merges) + 1) for t in tokens]
            space_prefix = any(n.get("type") == "Prepend" for n in _flatten(tj.get("normalizer")))
            model_name = "llama"
        else:
            model_name, space_prefix = "gpt2", None
    else:
        raise QuantkitError(f"{directory} has no tokenizer.model or BPE tokenizer.json to write into the GGUF file")
    if len(tokens) > vocab_size:
        raise QuantkitError(f"the tokenizer has {len(tokens)} tokens, more than the model's vocab_size {vocab_size}")
    for i in range(len(tokens), vocab_size):  # embedding rows no token uses
        tokens.append(f"[PAD{i}]")
        types.append(T.UNUSED)
        if scores is not None:
            scores.append(-1e4)
    writer.add_tokenizer_model(model_name)
    writer.add_tokenizer_pre("default" if model_name == "llama" else (pre or bpe_pre_name(tj)))
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    if space_prefix is not None:
        writer.add_add_space_prefix(space_prefix)
    special = gguf.SpecialVocab(directory, load_merges=model_name == "gpt2", n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    return model_name


# ---- the export ---------------------------------------------------------------------------
def export_gguf(src: str | Path, out: str | Path, *, float_type: str = "f16", requant: str | None = None,
                tokenizer_pre: str | None = None, overwrite: bool = False) -> dict:
    """Write ``src`` (a quantkit packed checkpoint, a GPTQ/AWQ-format checkpoint or a float
    model directory) as one GGUF file at ``out``, atomically. Returns a summary:
    ``{"output", "bytes", "tensors": {type: count}, "tokenizer"}``."""
    import logging

    import gguf

    from quantkit.checkpoint.formats import load_model

    src, out = Path(src), Path(out)
    if float_type not in FLOAT_TYPES:
        raise QuantkitError(f"float type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    if requant is not None and requant not in REQUANT_TYPES:
        raise QuantkitError(f"--requant must be one of {', '.join(REQUANT_TYPES)}, got {requant!r}")
    if not src.is_dir():
        raise QuantkitError(f"{src} is not a checkpoint directory (GGUF export reads a local model directory)")
    if out.exists() and not overwrite:
        raise QuantkitError(f"output {out} already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise QuantkitError(f"output {out} is a directory; give a .gguf file path")
    model, _ = load_model(str(src), with_tokenizer=False)
    arch = gguf_arch_for(model.config)
    with torch.no_grad():
        tensors = gguf_tensors(model, float_type, requant)
    counts = Counter(t.qtype for t in tensors)
    blocks = [(counts[b.name], b.file_type) for b in _block_types() if counts[b.name]]
    if blocks:
        file_type = max(blocks)[1]  # the block type most tensors use
    else:
        file_type = gguf.LlamaFileType.MOSTLY_F16 if counts["F16"] else gguf.LlamaFileType.ALL_F32

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    logging.getLogger("gguf").setLevel(logging.ERROR)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch.name)
        write_hparams(writer, model.config, file_type, src.name)
        tok_model = write_tokenizer(writer, src, model.config.vocab_size, tokenizer_pre)
        for t in tensors:
            if t.qtype in ("F32", "F16"):
                writer.add_tensor(t.name, t.data)
            else:
                writer.add_tensor(t.name, t.data, raw_dtype=gguf.GGMLQuantizationType[t.qtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"output": str(out), "bytes": out.stat().st_size, "tensors": dict(sorted(counts.items())), "tokenizer": tok_model}
