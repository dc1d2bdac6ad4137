"""Property-based fuzzing of what quantkit reads from users: checkpoints (config.json,
safetensors headers and bytes, packed quantization_config) and YAML recipes.  Whatever the
input, the loaders either succeed or raise one QuantkitError line -- never another exception."""

import json
import os
import shutil

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantkit import api
from quantkit.errors import QuantkitError
from quantkit.checkpoint.formats import load_model
from quantkit.recipe import load_recipe, parse_recipe
from quantkit.models.safetensors import read_header
from quantkit.models.skeleton import StreamSource

# a fixed, quick set of examples by default; QUANTKIT_FUZZ_EXAMPLES=2000 runs a longer random campaign
_CAMPAIGN = int(os.environ.get("QUANTKIT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_CAMPAIGN or 40, deadline=None, derandomize=not _CAMPAIGN, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DELETE = object()

scalars = (st.none() | st.booleans() | st.sampled_from([0, -1, 1, 2, 3, 7, 64, 10**9, 10**12, -(2**63), 2**64])
           | st.integers() | st.floats() | st.text(max_size=6))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=6)


def _loads_or_clean_error(path, stream=True):
    """Both loaders: transformers' (load_model) and the streaming one (headers + skeleton on meta)."""
    for load in (lambda: load_model(str(path), with_tokenizer=False), lambda: StreamSource.open(path)):
        try:
            load()
        except QuantkitError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
        if not stream:
            break


@pytest.fixture(scope="module")
def copies(tmp_path_factory, stories_dir_module):
    """A scratch copy of stories260K and a packed (RTN) checkpoint of it, restored before each example."""
    root = tmp_path_factory.mktemp("fuzz")
    model, tok = load_model(str(stories_dir_module))
    api.save(model, tok, root / "packed", "rtn", api.compress(model, "rtn", dict(bits=4, group_size=-1)))
    shutil.copytree(stories_dir_module, root / "float")
    return root


@pytest.fixture(scope="module")
def stories_dir_module():
    from pathlib import Path

    return Path(__file__).parent / "fixtures" / "stories260K"


def _scratch(copies, kind):
    d = copies / f"{kind}-scratch"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(copies / kind, d)
    return d


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "vocab_size", "head_dim", "model_type", "rope_parameters",
                                           "tie_word_embeddings", "dtype", "hidden_act", "max_position_embeddings",
                                           "rms_norm_eps", "architectures", "some_new_key"]),
                          st.just(DELETE) | json_values), min_size=1, max_size=3))
def test_mutated_config_json(copies, edits):
    d = _scratch(copies, "float")
    cfg = json.loads((d / "config.json").read_text())
    for key, value in edits:
        if value is DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    _loads_or_clean_error(d)


@FUZZ
@given(st.data())
def test_mutated_safetensors_bytes(copies, data):
    d = _scratch(copies, "float")
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    how = data.draw(st.sampled_from(["truncate", "flip_header", "flip_length", "header_field"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip_header":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(8, header_end - 1))] = data.draw(st.integers(0, 255))
    elif how == "flip_length":
        raw[data.draw(st.integers(0, 7))] = data.draw(st.integers(0, 255))
    else:  # a well-formed header with one field of one tensor replaced
        header = json.loads(raw[8:header_end])
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = data.draw(json_values | st.sampled_from(["F16", "I64", "BOOL", "F8_E4M3", "X9"])
                                        | st.lists(st.integers(-5, 10**6), max_size=3))
        body = json.dumps(header).encode()
        body += b" " * (-len(body) % 8)
        raw = bytearray(len(body).to_bytes(8, "little")) + body + raw[header_end:]
    f.write_bytes(bytes(raw))
    _loads_or_clean_error(d)
    try:
        read_header(f)
    except QuantkitError as e:
        assert "corrupt or truncated safetensors" in str(e) and "\n" not in str(e)


@FUZZ
@given(st.data())
def test_mutated_packed_quantization_config(copies, data):
    d = _scratch(copies, "packed")
    cfg = json.loads((d / "config.json").read_text())
    q = cfg["quantization_config"]
    target = data.draw(st.sampled_from(["top", "module", "modules"]))
    if target == "top":
        q[data.draw(st.sampled_from(["format_version", "quant_method", "bits", "group_size", "modules"]))] = data.draw(json_values)
    elif target == "module":
        entry = q["modules"][data.draw(st.sampled_from(sorted(q["modules"])))]
        entry[data.draw(st.sampled_from(["kind", "bits", "group_size", "sym", "act_order", "rank", "n", "m"]))] = data.draw(
            json_values | st.sampled_from(["quant", "lowrank", "w8a8", "nm_sparse", "nope"]))
    else:
        q["modules"][data.draw(st.sampled_from(["model", "", "lm_head", "model.layers.0", "model.layers.99.mlp.up_proj",
                                                "model.norm", "x.y"]))] = {"kind": "quant", "bits": 4, "group_size": -1, "sym": True}
    (d / "config.json").write_text(json.dumps(cfg))
    _loads_or_clean_error(d, stream=False)  # --stream refuses a packed checkpoint up front


@FUZZ
@given(st.data())
def test_mutated_shard_index(tiny_sharded, tmp_path_factory, data):
    d = tmp_path_factory.mktemp("index") / "m"
    shutil.copytree(tiny_sharded, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    names = sorted(index["weight_map"])
    how = data.draw(st.sampled_from(["value", "delete", "weight_map", "top", "text"]))
    if how == "value":
        index["weight_map"][data.draw(st.sampled_from(names))] = data.draw(
            json_values | st.sampled_from(["../config.json", "/etc/passwd", "model-00002-of-00005.safetensors", "config.json", ""]))
    elif how == "delete":
        del index["weight_map"][data.draw(st.sampled_from(names))]
    elif how == "weight_map":
        index["weight_map"] = data.draw(json_values)
    elif how == "top":
        index = data.draw(json_values)
    (d / "model.safetensors.index.json").write_text(data.draw(st.text(max_size=30)) if how == "text" else json.dumps(index))
    _loads_or_clean_error(d)


# ---- recipes ---------------------------------------------------------------------------------------

VALID = yaml.safe_load("""
description: fuzz base
calibration: {dataset: c4, nsamples: 8, seqlen: 64, seed: 0}
steps:
  - method: gptq
    bits: 4
    group_size: 64
    act_order: true
    ignore: ['mlp\\.down_proj$']
    overrides:
      - {match: 'layers\\.0\\.', bits: 8}
""")


def _parse_or_clean_error(data):
    try:
        parse_recipe(data)
    except QuantkitError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))


@FUZZ
@given(json_values)
def test_random_recipe_structures(data):
    _parse_or_clean_error(data)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(st.data())
def test_mutated_valid_recipe(data):
    import copy

    recipe = copy.deepcopy(VALID)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(_paths(recipe))[1:]))
        node = recipe
        for p in path[:-1]:
            node = node[p]
        value = data.draw(json_values | st.sampled_from(["gptq", "awq", "rtn", "nope", "[", "(?P<", 3, 8, -1, 0, 2**40]))
        if isinstance(node, dict) and data.draw(st.booleans()):
            node.pop(path[-1])
        else:
            node[path[-1]] = value
    _parse_or_clean_error(recipe)


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
       st.lists(st.text(max_size=20), max_size=2))
def test_random_recipe_text_and_sets(tmp_path_factory, text, sets):
    f = tmp_path_factory.mktemp("recipe") / "r.yaml"
    f.write_text(text, encoding="utf-8", errors="surrogateescape")
    for attempt in (text, yaml.safe_dump(VALID)):
        f.write_text(attempt, encoding="utf-8", errors="surrogateescape")
        try:
            load_recipe(f, tuple(sets))
        except QuantkitError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
