"""The ``tokenizer.ggml.*`` part of a GGUF file, from a checkpoint's tokenizer files.

Two tokenizer models, as llama.cpp reads them: ``"llama"`` (SentencePiece-style: a
``tokenizer.model``, or a SentencePiece BPE converted to tokenizer.json, scored by merge rank)
and ``"gpt2"`` (byte-level BPE, whose pre-tokenizer llama.cpp knows by name: :func:`bpe_pre_name`).
Tokens are written in id order with their ``gguf.TokenType``, padded with unused tokens to the
model's ``vocab_size``; special tokens and merges come from the ``gguf`` package's ``SpecialVocab``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError


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


def _merge_ranks(merges: list) -> tuple[dict[str, int], int]:
    """The first merge rank of each merged piece, and the number of merges."""
    pairs = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]
    rank = {}
    for r, (a, b) in enumerate(pairs):
        rank.setdefault(a + b, r)
    return rank, len(pairs)


@dataclass
class Vocab:
    """A tokenizer as ``tokenizer.ggml.*`` holds it: ``model`` ``"llama"`` (SentencePiece-style)
    or ``"gpt2"`` (byte-level BPE), tokens in id order with their ``gguf.TokenType``, scores
    (SentencePiece-style only) and whether a space is prepended (``None``: not written)."""

    model: str
    tokens: list[str | bytes]
    types: list[int]
    scores: list[float] | None
    space_prefix: bool | None


def _sentencepiece_vocab(sp_path: Path) -> Vocab:
    """The SentencePiece model itself: its own pieces, scores and types."""
    import sentencepiece as spm
    from gguf import TokenType as T

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                     T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL)
    return Vocab("llama", tokens, types, scores, True)


def _bpe_token_type(token: str, i: int, added: dict[int, dict], spm_like: bool, unk: str | None) -> int:
    from gguf import TokenType as T

    if spm_like and token == unk:
        return T.UNKNOWN
    if i in added:
        return T.CONTROL if added[i].get("special") else T.USER_DEFINED
    if spm_like and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return T.BYTE
    return T.NORMAL


def _bpe_vocab(tj: dict, tj_path: Path) -> Vocab:
    """A BPE tokenizer.json: byte-level (``gpt2``), or a converted SentencePiece model (``llama``,
    scored by merge rank)."""
    vocab = dict(tj["model"]["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for a in added.values():
        vocab.setdefault(a["content"], a["id"])
    by_id = {i: t for t, i in vocab.items()}
    spm_like = _spm_like(tj)
    unk = tj["model"].get("unk_token")
    rank, n_merges = _merge_ranks(tj["model"].get("merges", []))
    tokens, types = [], []
    for i in range(len(by_id)):
        t = by_id.get(i)
        if t is None:
            raise QuantkitError(f"{tj_path}: token id {i} is missing from the vocabulary")
        tokens.append(t)
        types.append(_bpe_token_type(t, i, added, spm_like, unk))
    if not spm_like:
        return Vocab("gpt2", tokens, types, None, None)
    # llama.cpp's SentencePiece tokenizer merges the highest-scoring pair first: the merge rank
    # orders pieces as SentencePiece's scores did
    scores = [-float(rank[t]) if t in rank else -float(n_merges + 1) for t in tokens]
    space_prefix = any(n.get("type") == "Prepend" for n in _flatten(tj.get("normalizer")))
    return Vocab("llama", tokens, types, scores, space_prefix)


def read_vocab(directory: Path, tj: dict | None, vocab_size: int) -> Vocab:
    """The checkpoint's tokenizer (``tokenizer.model`` first, else a BPE ``tokenizer.json``
    already parsed as ``tj``), padded with unused tokens to the model's ``vocab_size``."""
    from gguf import TokenType as T

    if (directory / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(directory / "tokenizer.model")
    elif tj is not None and tj.get("model", {}).get("type") == "BPE":
        vocab = _bpe_vocab(tj, directory / "tokenizer.json")
    else:
        raise QuantkitError(f"{directory} has no tokenizer.model or BPE tokenizer.json to write into the GGUF file")
    if len(vocab.tokens) > vocab_size:
        raise QuantkitError(f"the tokenizer has {len(vocab.tokens)} tokens, more than the model's vocab_size {vocab_size}")
    for i in range(len(vocab.tokens), vocab_size):  # embedding rows no token uses
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(T.UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1e4)
    return vocab


def write_tokenizer(writer, directory: Path, vocab_size: int, pre: str | None = None) -> str:
    """``tokenizer.ggml.*`` from the checkpoint's tokenizer files; returns the tokenizer model name."""
    import gguf

    tj_path = directory / "tokenizer.json"
    tj = json.loads(tj_path.read_text()) if tj_path.is_file() else None
    vocab = read_vocab(directory, tj, vocab_size)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre("default" if vocab.model == "llama" else (pre or bpe_pre_name(tj)))
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.space_prefix is not None:
        writer.add_add_space_prefix(vocab.space_prefix)
    special = gguf.SpecialVocab(directory, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    special.add_to_gguf(writer, quiet=True)
    return vocab.model
