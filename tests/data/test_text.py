import json
import os

import pytest
import torch

from quantkit.data import calibration_samples, eval_windows, load_text, tokenize
from quantkit.errors import QuantkitError


class CharTok:
    """A byte-level stand-in tokenizer: tests of data plumbing need no model."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": list(text.encode())}


def test_named_datasets_resolve_offline():
    wiki = load_text("wikitext2", "test")
    assert wiki.startswith(" = Robert Boulter = \n\n\n Robert Boulter is")
    assert len(load_text("ptb", "test")) > 100_000
    assert len(load_text("c4", "validation")) > 1_000_000


def test_jsonl_and_text_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert load_text(str(tmp_path / "a.jsonl")) == "hello\n\nworld"
    (tmp_path / "b.txt").write_text("plain text")
    assert load_text(str(tmp_path / "b.txt")) == "plain text"


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "t.parquet")
    assert load_text(str(tmp_path / "t.parquet")) == "one\n\ntwo"


@pytest.mark.parametrize("content,message", [
    ('{"text": 1}\n', "no string 'text' field"),
    ("not json\n", "is not valid JSON"),
])
def test_bad_jsonl(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(QuantkitError, match=message):
        load_text(str(tmp_path / "bad.jsonl"))


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(QuantkitError, match="does not exist"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(QuantkitError, match="unknown dataset"):
        load_text("imagenet")


def test_binary_file_is_refused(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(QuantkitError, match="not UTF-8"):
        load_text(str(tmp_path / "x.txt"))


def test_eval_windows_follow_gptq_protocol():
    ids = torch.arange(1000)
    w = eval_windows(ids, 128)
    assert w.shape == (7, 128) and torch.equal(w[1], torch.arange(128, 256))
    assert eval_windows(ids, 128, max_windows=2).shape == (2, 128)
    with pytest.raises(QuantkitError, match="shorter than one window"):
        eval_windows(ids, 2048)


def test_calibration_is_seeded(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij" * 100)
    a = calibration_samples(CharTok(), str(tmp_path / "t.txt"), 4, 32, seed=0)
    b = calibration_samples(CharTok(), str(tmp_path / "t.txt"), 4, 32, seed=0)
    c = calibration_samples(CharTok(), str(tmp_path / "t.txt"), 4, 32, seed=1)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_tokenizer_fixture_matches_sentencepiece(stories_dir, tiny_text):
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(stories_dir / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    text = tiny_text.read_text()[:4000]
    assert tokenize(tok, text).tolist() == sp.encode(text)
    assert tok("Once upon a time").input_ids == [1, 403, 407, 261, 378]


@pytest.mark.parametrize("make,kind", [(lambda p: p.mkdir(), "a directory"), (lambda p: os.mkfifo(p), "a FIFO"),
                                       (lambda p: os.symlink("/dev/zero", p), "a character device")])
def test_a_data_path_that_is_not_a_regular_file_says_what_it_is(tmp_path, make, kind):
    make(tmp_path / "data.txt")  # a FIFO would block a reader forever: refused before it is opened
    with pytest.raises(QuantkitError, match=f"dataset file .*data.txt is {kind}"):
        load_text(str(tmp_path / "data.txt"))


# ---- unreadable files are one-line errors naming the file (audit root cause 14: C11) -----------

@pytest.mark.parametrize("name,content,message", [
    ("garbage.parquet", b"PAR1" + bytes(range(256)) * 100, r"cannot read dataset file .*garbage.parquet: .*Parquet"),
    ("empty.parquet", b"", r"cannot read dataset file .*empty.parquet: "),
    ("deep.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", r"deep.jsonl:1 is not valid JSON \(nested too deeply\)"),
    ("digits.jsonl", b'{"text": "a", "n": ' + b"1" * 5000 + b"}\n", r"digits.jsonl:1 is not valid JSON \(Exceeds the limit"),
    ("surrogate.jsonl", b'{"text": "ok"}\n{"text": "a \\ud800 b"}\n', r"surrogate.jsonl:2 has a 'text' that is not valid Unicode"),
    ("latin1.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"), r"latin1.jsonl is not UTF-8 text \(invalid continuation byte"),
    ("latin1.txt", "caf\u00e9 au lait".encode("latin-1"), r"latin1.txt is not UTF-8 text"),
])
def test_unreadable_data_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(QuantkitError, match=message) as e:
        load_text(str(tmp_path / name))
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_read_errors_name_the_file(tmp_path, monkeypatch):
    from pathlib import Path

    (tmp_path / "t.txt").write_text("text")

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(QuantkitError, match=r"cannot read dataset file .*t.txt: Permission denied"):
        load_text(str(tmp_path / "t.txt"))


# ---- calibration settings checked once for the CLI and recipes ------------------------------------

def test_seed_outside_64_bits_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij" * 100)
    with pytest.raises(QuantkitError, match=r"seed must be between -9223372036854775808 and 18446744073709551615, got 18446744073709551616$"):
        calibration_samples(CharTok(), str(tmp_path / "t.txt"), 4, 32, seed=2**64)
    assert calibration_samples(CharTok(), str(tmp_path / "t.txt"), 4, 32, seed=2**64 - 1).shape == (4, 32)


def test_absurd_calibration_size_message_stays_short():
    from quantkit.data import check_calibration_size

    with pytest.raises(QuantkitError, match=r"nsamples x seqlen = <an integer of \d+ bits> calibration tokens") as e:
        check_calibration_size(16 ** 4000, 2048)  # 4800 digits: Python would refuse to print it
    assert len(str(e.value)) < 200


def test_context_check_names_the_setting():
    from types import SimpleNamespace

    from quantkit.data import check_context

    cfg = SimpleNamespace(max_position_embeddings=512)
    check_context(512, cfg)
    with pytest.raises(QuantkitError, match=r"^--seqlen 1024 exceeds the model's context of 512 tokens$"):
        check_context(1024, cfg)
    with pytest.raises(QuantkitError, match=r"^calibration.seqlen 1024 exceeds the model's context of 512 tokens$"):
        check_context(1024, cfg, name="calibration.seqlen")
    check_context(10**6, SimpleNamespace())  # no context length in the config: nothing to check
