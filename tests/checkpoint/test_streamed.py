"""Streaming from safetensors shards gives the in-memory path's checkpoint, byte for byte, with
one block in memory at a time; inputs it cannot stream get one clear error."""

import json
import random

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from quantkit import api
from quantkit.cli import cli
from quantkit.errors import QuantkitError
from quantkit.checkpoint.formats import load_model
from quantkit.api import compress_streaming
from quantkit.calibrate.offload import DiskActivations, OffloadHooks
from quantkit.calibrate.workdir import work_dir_for
from quantkit.checkpoint.streamed import StreamHooks
from quantkit.models.safetensors import read_header, read_tensor, write_safetensors
from quantkit.models.skeleton import should_stream

CALIB = dict(nsamples=6, seqlen=32, batch_size=4)  # 4 + 2: the last batch is smaller


def _in_memory(src, out, method, opts, tiny_text, **kw):
    model, tok = load_model(str(src), **kw)
    res = api.compress(model, method, opts, tokenizer=tok, calib=str(tiny_text), **CALIB)
    api.save(model, tok, out, method, res)
    return res


def _same_checkpoint(a, b):
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ta = {k: read_tensor(i) for k, i in read_header(a / "model.safetensors").items()}
    tb = {k: read_tensor(i) for k, i in read_header(b / "model.safetensors").items()}
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_writer_matches_save_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}.{random.Random(i).choice('abc')}": torch.randn(3, i + 1, generator=g).to(dt)
               for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.uint8, torch.int64,
                                       torch.bool, torch.int8, torch.float64, torch.int16])}
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    write_safetensors(tmp_path / "b.safetensors", [(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()],
                      {"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    back = {k: read_tensor(i) for k, i in read_header(tmp_path / "a.safetensors").items()}
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("method,opts", [("gptq", dict(bits=4, group_size=-1)), ("rtn", dict(bits=3, group_size=32, sym=False))])
def test_stream_equals_in_memory_stories(method, opts, stories_dir, tiny_text, tmp_path):
    if method == "rtn":
        opts = dict(opts, group_size=-1)  # stories260K's 172-wide MLP takes no group of 32
    _in_memory(stories_dir, tmp_path / "mem", method, opts, tiny_text)
    compress_streaming(stories_dir, tmp_path / "st", method, opts, calib=str(tiny_text), **CALIB)
    _same_checkpoint(tmp_path / "mem", tmp_path / "st")
    assert not work_dir_for(tmp_path / "st").exists()


@pytest.mark.parametrize("method,opts", [("gptq", dict(bits=4, group_size=32, act_order=True, static_groups=False)), ("awq", dict(bits=4, group_size=32)),
                                         ("rtn", dict(bits=4, group_size=32))])
def test_stream_equals_in_memory_sharded(method, opts, tiny_sharded, tiny_text, tmp_path):
    assert len(list(tiny_sharded.glob("model-*.safetensors"))) >= 2
    _in_memory(tiny_sharded, tmp_path / "mem", method, opts, tiny_text)
    compress_streaming(tiny_sharded, tmp_path / "st", method, opts, calib=str(tiny_text), **CALIB)
    _same_checkpoint(tmp_path / "mem", tmp_path / "st")
    # the runtime loads it and computes what the in-memory packed model computes
    a, _ = load_model(str(tmp_path / "mem"), with_tokenizer=False)
    b, _ = load_model(str(tmp_path / "st"), with_tokenizer=False)
    ids = torch.arange(20).unsqueeze(0)
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_stream_dtype_override(tiny_sharded, tiny_text, tmp_path):
    _in_memory(tiny_sharded, tmp_path / "mem", "rtn", dict(bits=4, group_size=-1), tiny_text, dtype="float32")
    compress_streaming(tiny_sharded, tmp_path / "st", "rtn", dict(bits=4, group_size=-1), dtype="float32")
    _same_checkpoint(tmp_path / "mem", tmp_path / "st")


def test_one_block_in_memory_at_a_time(tiny_sharded, tiny_text, tmp_path, monkeypatch):
    seen = []
    load = StreamHooks.load_block

    def spy(self, index, block):
        load(self, index, block)
        real = sorted({n.split(".")[2] for n, p in self.source.model.named_parameters() if not p.is_meta})
        seen.append((index, real))

    monkeypatch.setattr(StreamHooks, "load_block", spy)
    compress_streaming(tiny_sharded, tmp_path / "st", "gptq", dict(bits=4, group_size=32), calib=str(tiny_text), **CALIB)
    assert seen == [(i, [str(i)]) for i in range(4)]  # embeddings and head freed once block 0's inputs are caught


def test_offloaded_activations_change_nothing(stories_dir, tiny_text, tmp_path):
    _in_memory(stories_dir, tmp_path / "mem", "gptq", dict(bits=4, group_size=-1), tiny_text)
    model, tok = load_model(str(stories_dir))
    hooks = OffloadHooks(tmp_path / "acts")
    res = api.compress(model, "gptq", dict(bits=4, group_size=-1), tokenizer=tok, calib=str(tiny_text), hooks=hooks, **CALIB)
    assert len(list((tmp_path / "acts").rglob("*.safetensors"))) == 2  # only the current block's inputs
    hooks.cleanup()
    api.save(model, tok, tmp_path / "off", "gptq", res)
    _same_checkpoint(tmp_path / "mem", tmp_path / "off")


def test_disk_activations_round_trip(tmp_path):
    acts = DiskActivations(tmp_path)
    hs = [torch.randn(2, 5, 4, dtype=torch.bfloat16), torch.randn(1, 5, 4, dtype=torch.bfloat16)]
    for h in hs:
        acts.append(h, {"k": 1})
    assert len(acts) == 2 and torch.equal(acts[-1][0], hs[1]) and acts[0][1] == {"k": 1}
    acts.advance(lambda h, kw: h * 2)
    assert [torch.equal(h, x * 2) for (h, _), x in zip(acts, hs)] == [True, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen-00001"]


def test_cli_stream(tiny_sharded, tiny_text, tmp_path):
    r = CliRunner().invoke(cli, ["quantize", str(tiny_sharded), "-o", str(tmp_path / "out"), "--method", "gptq", "--group-size", "32",
                                 "--calib", str(tiny_text), "--nsamples", "4", "--seqlen", "32", "--stream", "--json",
                                 "--offload-activations", str(tmp_path / "acts")])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.output.strip().splitlines()[-1])
    assert payload["stream"] is True and payload["modules"] == 28
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert not list((tmp_path / "acts").iterdir()) and not work_dir_for(tmp_path / "out").exists()


def _packed(stories_dir, tmp_path):
    model, tok = load_model(str(stories_dir))
    api.save(model, tok, tmp_path / "packed", "rtn", api.compress(model, "rtn", dict(bits=4, group_size=-1)))
    return tmp_path / "packed"


@pytest.mark.parametrize("case,message", [
    ("gguf", "a GGUF file is not stored as safetensors blocks"),
    ("pickle", "pickle files (.bin/.pt); --stream reads safetensors only"),
    ("packed", "it is already quantized ('quantkit')"),
    ("hub", "--stream reads a local directory"),
    ("missing", "does not exist"),
    ("shapes", "config.json disagrees with the shapes of the stored weights"),
    ("missing_tensor", "the checkpoint has no tensor model.layers.3.mlp.up_proj.weight"),
    ("nan", "model.layers.2.mlp.up_proj.weight holds 1 NaN/Inf"),
    ("index_escape", "names a shard outside its directory"),
    ("truncated_shard", "corrupt or truncated safetensors file"),
    ("lm_head", "--stream does not quantize lm_head yet"),
])
def test_cli_stream_bad_inputs(case, message, stories_dir, tiny_sharded, tmp_path):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(tiny_sharded if case in ("missing_tensor", "index_escape", "truncated_shard") else stories_dir, src)
    extra = []
    if case == "gguf":
        (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\0" * 64)
        src = tmp_path / "x.gguf"
    elif case == "pickle":
        (src / "model.safetensors").unlink()
        torch.save({}, src / "pytorch_model.bin")
    elif case == "packed":
        src = _packed(stories_dir, tmp_path)
    elif case == "hub":
        src = "someone/some-model"
    elif case == "missing":
        src = tmp_path / "nothing"
    elif case == "shapes":
        cfg = json.loads((src / "config.json").read_text())
        cfg["intermediate_size"] = 200
        (src / "config.json").write_text(json.dumps(cfg))
    elif case == "missing_tensor":
        index = json.loads((src / "model.safetensors.index.json").read_text())
        shard = src / index["weight_map"].pop("model.layers.3.mlp.up_proj.weight")
        tensors = {k: read_tensor(i) for k, i in read_header(shard).items() if k != "model.layers.3.mlp.up_proj.weight"}
        save_file(tensors, str(shard))
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    elif case == "nan":
        t = {k: read_tensor(i).clone() for k, i in read_header(src / "model.safetensors").items()}
        t["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
        save_file(t, str(src / "model.safetensors"))
    elif case == "index_escape":
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["weight_map"]["model.norm.weight"] = "../../etc/passwd"
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    elif case == "truncated_shard":
        shard = sorted(src.glob("model-*.safetensors"))[1]
        shard.write_bytes(shard.read_bytes()[:-100])
    elif case == "lm_head":
        extra = ["--quantize-lm-head"]
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(out), "--method", "rtn", "--group-size", "-1", "--stream", *extra])
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output
    assert r.output.count("Error:") == 1
    assert not out.exists() and not work_dir_for(out).exists()


def test_read_header_rejects_overlapping_tensors(tmp_path):
    f = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.zeros(2)}, str(f))
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["b"]["data_offsets"] = [0, 8]  # overlaps "a"
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    f.write_bytes(len(body).to_bytes(8, "little") + body + bytes(raw[8 + n:]))
    with pytest.raises(QuantkitError, match="tensors overlap"):
        read_header(f)


def test_should_stream_when_weights_exceed_half_of_memory(tiny_sharded, stories_dir, monkeypatch):
    import quantkit.models.skeleton as st

    size = sum(f.stat().st_size for f in tiny_sharded.glob("model-*.safetensors"))
    monkeypatch.setattr(st, "available_memory", lambda: size)
    assert should_stream(tiny_sharded)  # ~size of weights > half of "memory"
    monkeypatch.setattr(st, "available_memory", lambda: 10 * size)
    assert not should_stream(tiny_sharded)
    assert should_stream(tiny_sharded, dtype="float32") is False  # 2x bigger in fp32, still < 5x
    monkeypatch.setattr(st, "available_memory", lambda: 3 * size)
    assert should_stream(tiny_sharded, dtype="float32")  # bf16 -> fp32 doubles it: 2x > 1.5x
    assert not should_stream(str(stories_dir) + "/missing")


_COMMON = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "mistral": ("MistralConfig", _COMMON), "qwen2": ("Qwen2Config", _COMMON), "qwen3": ("Qwen3Config", dict(_COMMON, head_dim=8)),
    "gemma": ("GemmaConfig", dict(_COMMON, head_dim=8)), "gemma2": ("Gemma2Config", dict(_COMMON, head_dim=8)),
    "gemma3_text": ("Gemma3TextConfig", dict(_COMMON, head_dim=8)), "phi3": ("Phi3Config", dict(_COMMON, pad_token_id=0)),
    "opt": ("OPTConfig", dict(vocab_size=512, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=64, word_embed_proj_dim=32)),
    "gpt2": ("GPT2Config", dict(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64)),  # stored as embed_out, loaded as lm_head
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_streams_to_the_same_bytes(family, stories_dir, tiny_text, tmp_path):
    import shutil

    import transformers

    cls_name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs)).save_pretrained(tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories_dir / f, tmp_path / "m" / f)
    _in_memory(tmp_path / "m", tmp_path / "mem", "gptq", dict(bits=4, group_size=-1), tiny_text)
    compress_streaming(tmp_path / "m", tmp_path / "st", "gptq", dict(bits=4, group_size=-1), calib=str(tiny_text), **CALIB)
    _same_checkpoint(tmp_path / "mem", tmp_path / "st")


def test_a_streamed_run_reads_each_shard_header_once(tiny_sharded, tiny_text, tmp_path, monkeypatch):
    """should_stream, the skeleton's header checks and the resume fingerprint share one read per shard."""
    import os
    import shutil

    import quantkit.models.safetensors as sft

    src = tmp_path / "src"
    shutil.copytree(tiny_sharded, src)
    for f in src.iterdir():  # files older than the mtime granularity are cached
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns - 10**10))
    parsed = []
    real = sft._parse_header
    monkeypatch.setattr(sft, "_parse_header", lambda path, size: parsed.append(path) or real(path, size))
    r = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(tmp_path / "out"), "--method", "rtn", "--group-size", "32",
                                 "--stream", "--json"])
    assert r.exit_code == 0, r.output
    shards = sorted(f.name for f in src.glob("model-*.safetensors"))
    assert len(shards) == 5 and sorted(p.name for p in parsed if p.parent == src) == shards


def test_a_rewritten_file_is_read_again(tmp_path):
    import os

    f = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(4)}, str(f))
    os.utime(f, ns=(0, 10**18))
    assert set(read_header(f)) == {"a"}
    save_file({"b": torch.zeros(4)}, str(f))  # same size, within the same mtime tick
    assert set(read_header(f)) == {"b"}
    os.utime(f, ns=(0, 10**18))  # even with the old mtime forced back: size and inode...
    save_file({"c": torch.zeros(2), "d": torch.zeros(2)}, str(f))
    os.utime(f, ns=(0, 10**18))
    assert set(read_header(f)) == {"c", "d"}  # ...differ (size here)
