"""Text for calibration and evaluation.

A source is a dataset name (``wikitext2``, ``ptb``, ``c4``, ``tinystories``) or a local file:
plain text (``.txt``, ``.raw`` or anything else), JSON lines with a ``text`` field
(``.jsonl``), or ``.parquet`` with a ``text`` column.

Names resolve first to the copies shipped in ``quantkit/data/files`` (or ``$QUANTKIT_DATA_DIR``)
and otherwise through ``datasets`` (online users).  Evaluation text follows the GPTQ protocol:
WikiText-2 rows joined with ``"\\n\\n"``, PTB sentences joined with ``" "``, C4 documents with ``" "``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantkit.errors import QuantkitError, clip, excerpt
from quantkit.memory import release_freed_memory
from quantkit.models.paths import file_kind

# name -> {split: (file relative to the data dir, how its records are joined)}
_LOCAL = {
    "wikitext2": {"test": ("wikitext2/wiki.test.raw", "\n\n"), "validation": ("wikitext2/wiki.valid.tokens", "\n\n")},
    "ptb": {"test": ("ptb/ptb.test.txt", " "), "validation": ("ptb/ptb.valid.txt", " ")},
    "c4": {"validation": ("c4/c4-validation-sample-calib.jsonl", " ")},
    "tinystories": {"validation": ("tinystories/TinyStories-valid.sample.txt", None)},
}
# name -> (datasets args, split names, text field, joiner) for users who are online
_HUB = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {"test": "test", "validation": "validation", "train": "train"}, "text", "\n\n"),
    "ptb": (("ptb_text_only", "penn_treebank"), {"test": "test", "validation": "validation", "train": "train"}, "sentence", " "),
    "c4": (("allenai/c4",), {"validation": "validation", "train": "train"}, "text", " "),
}
DATASET_NAMES = tuple(sorted(set(_LOCAL) | set(_HUB)))


@dataclass(frozen=True)
class CalibSpec:
    """Which calibration windows a compression run draws: the one place their defaults are written
    (the CLI generates its calibration options from these fields; recipes, the API and streaming
    runs start from them)."""

    dataset: str = field(default="c4", metadata={"help": "Calibration data: a dataset name or a local file."})  # DATASET_NAMES
    nsamples: int = field(default=128, metadata={"help": "Calibration windows."})
    seqlen: int = field(default=2048, metadata={"help": "Tokens per calibration window."})
    seed: int = field(default=0, metadata={"help": "Seed of the calibration windows."})
    batch_size: int = field(default=8, metadata={"help": "Calibration windows per forward."})


def _data_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("QUANTKIT_DATA_DIR"):
        dirs.append(Path(os.environ["QUANTKIT_DATA_DIR"]))
    dirs.append(Path(__file__).parent / "files")
    return dirs


def _records(path: Path) -> list[str]:
    """The text records of a local file, by its extension."""
    kind = file_kind(path)
    if kind == "missing":
        raise QuantkitError(f"dataset file {path} does not exist")
    if kind is not None:  # reading a FIFO would block; a directory or a device is no text
        raise QuantkitError(f"dataset file {path} is {kind}, not a regular file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _jsonl_records(path)
        if suffix == ".parquet":
            return _parquet_records(path)
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise QuantkitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # permissions, I/O errors
        raise QuantkitError(f"cannot read dataset file {path}: {clip(e.strerror or str(e), 160)}") from None


def _jsonl_records(path: Path) -> list[str]:
    """The ``text`` field of every non-blank line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuantkitError(f"{path}:{i} is not valid JSON ({e.msg} at column {e.colno})") from None
            except (ValueError, RecursionError) as e:  # a 5000-digit number; nesting past the stack
                why = "nested too deeply" if isinstance(e, RecursionError) else clip(str(e), 80)
                raise QuantkitError(f"{path}:{i} is not valid JSON ({why})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise QuantkitError(f"{path}:{i} has no string 'text' field")
            try:
                obj["text"].encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer takes
                raise QuantkitError(f"{path}:{i} has a 'text' that is not valid Unicode ({e.reason} at character {e.start})") from None
            out.append(obj["text"])
    return out


def _parquet_records(path: Path) -> list[str]:
    """The string values of the ``text`` column."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise QuantkitError("reading .parquet needs pyarrow (installed with `datasets`)") from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:  # not parquet, truncated, corrupt
        raise QuantkitError(f"cannot read dataset file {path}: {clip(str(e), 160)}") from None
    if "text" not in table.column_names:
        raise QuantkitError(f"{path} has no 'text' column (columns: {clip(', '.join(table.column_names), 120)})")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def load_text(source: str, split: str = "test") -> str:
    """All text of ``source`` for ``split`` as one string."""
    p = Path(source)
    if p.exists() or any(sep in source for sep in ("/", os.sep)) or p.suffix:
        records = _records(p)
        return "\n\n".join(records) if p.suffix.lower() in (".jsonl", ".parquet") else records[0]
    name = source.lower().replace("-", "").replace("_", "")
    name = {"wikitext": "wikitext2", "wiki": "wikitext2", "wikitext2raw": "wikitext2"}.get(name, name)
    if name not in DATASET_NAMES:
        raise QuantkitError(f"unknown dataset {source!r}: give a file path or one of {', '.join(DATASET_NAMES)}")
    local = _LOCAL.get(name, {}).get(split)
    if local is not None:
        for d in _data_dirs():
            f = d / local[0]
            if f.is_file():
                text_records = _records(f)
                if f.suffix == ".jsonl":
                    return local[1].join(text_records)
                if local[1] is None:
                    return text_records[0]
                # one record per line, each keeping its newline (as the hub's rows do), then joined:
                # this reproduces the published WikiText-2 protocol figures exactly
                lines = text_records[0].splitlines(keepends=True)
                if local[1] == " ":
                    lines = [line.rstrip("\n") for line in lines]
                return local[1].join(lines)
    if name not in _HUB or split not in _HUB[name][1]:
        raise QuantkitError(f"dataset {name!r} has no {split!r} split available offline; give a local file")
    args, splits, field, joiner = _HUB[name]
    try:
        from datasets import load_dataset

        ds = load_dataset(*args, split=splits[split])
    except Exception as e:  # noqa: BLE001 - network, hub and format errors alike
        raise QuantkitError(f"cannot load dataset {name} ({split}) through `datasets`: {str(e).splitlines()[0][:200]}; "
                            "give a local file instead") from None
    return joiner.join(ds[field])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one ``[n_tokens]`` id tensor (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    release_freed_memory()  # a long text's encoding (offsets, token strings) is several times its ids
    return ids


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n_windows, seqlen]`` (GPTQ protocol; the tail is dropped)."""
    n = ids.numel() // seqlen
    if n == 0:
        raise QuantkitError(f"the evaluation text has {ids.numel()} tokens, shorter than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)


MAX_CALIB_TOKENS = 1 << 24  # 16.8M tokens: 64x GPTQ's usual 128 x 2048


def check_calibration_size(nsamples: int, seqlen: int) -> None:
    """Refuse, before any work, a calibration set that is empty or absurdly large."""
    if nsamples < 1 or seqlen < 2:
        raise QuantkitError(f"need nsamples >= 1 and seqlen >= 2, got {excerpt(nsamples)} and {excerpt(seqlen)}")
    total = nsamples * seqlen
    if total > MAX_CALIB_TOKENS:
        shown = f"{total:,}" if total.bit_length() <= 128 else excerpt(total)  # no repr past 4300 digits
        raise QuantkitError(f"nsamples x seqlen = {shown} calibration tokens is more than quantkit takes "
                            f"({MAX_CALIB_TOKENS:,}); use fewer --nsamples or a shorter --seqlen")


def check_seed(seed: int) -> None:
    """Refuse a seed torch's generator cannot take (it takes any 64-bit integer, signed or not)."""
    if not -(1 << 63) <= seed < (1 << 64):
        raise QuantkitError(f"seed must be between {-(1 << 63)} and {(1 << 64) - 1}, got {excerpt(seed)}")


def check_context(seqlen: int, *configs, whose: str = "model's", name: str = "--seqlen") -> None:
    """Refuse windows of ``seqlen`` tokens beyond the (smallest) ``max_position_embeddings`` of
    ``configs``: the one check of the CLI's ``--seqlen`` and of a recipe's ``calibration.seqlen``
    (``name``: how the message names the setting)."""
    caps = [c for c in (getattr(cfg, "max_position_embeddings", None) for cfg in configs) if c]
    if caps and seqlen > min(caps):
        raise QuantkitError(f"{name} {seqlen} exceeds the {whose} context of {min(caps)} tokens")


def calibration_samples(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0, split: str = "validation") -> torch.Tensor:
    """``[nsamples, seqlen]`` random windows of the source's text, seeded (same inputs -> same samples)."""
    check_calibration_size(nsamples, seqlen)
    check_seed(seed)
    try:
        text = load_text(source, split)
    except QuantkitError as e:
        if split != "test" and "split" in str(e):
            text = load_text(source, "test")
        else:
            raise
    ids = tokenize(tokenizer, text)
    if ids.numel() < seqlen + 1:
        raise QuantkitError(f"calibration text {source} has {ids.numel()} tokens, shorter than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
