"""Shared fixtures: the real stories260K model (tests/fixtures, MIT) and its TinyStories text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Every Triton kernel runs in Triton's CPU interpreter in the tests, except in a GPU run (a marker
# expression selecting `gpu` tests, e.g. `pytest -m gpu`, on a machine with CUDA), where the tests
# marked `gpu` run the kernels for real.  TRITON_INTERPRET is read when triton.language is first
# imported and when each @triton.jit function is defined, so it is set in pytest_configure, before
# any test module is collected: a module that imports quantkit's runtime imports the kernels (and
# Triton) at collection time.  (Importing torch does not import Triton.)


def pytest_configure(config):
    expr = (config.getoption("markexpr", "") or "").replace("(", " ").replace(")", " ").split()
    gpu_run = "gpu" in expr and not any(a == "not" and b == "gpu" for a, b in zip(expr, expr[1:]))
    if not gpu_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")


FIXTURES = Path(__file__).parent / "fixtures"
STORIES = FIXTURES / "stories260K"
TINY_TEXT = FIXTURES / "tinystories.txt"


@pytest.fixture
def stories_dir() -> Path:
    return STORIES


@pytest.fixture
def tiny_text() -> Path:
    return TINY_TEXT


@pytest.fixture
def stories():
    """(model, tokenizer) of stories260K in fp32, freshly loaded (tests mutate it)."""
    from quantkit.checkpoint.formats import load_model

    torch.manual_seed(0)
    return load_model(str(STORIES))


@pytest.fixture
def calib_ids(stories):
    from quantkit.data import calibration_samples

    return calibration_samples(stories[1], str(TINY_TEXT), nsamples=8, seqlen=128, seed=0)


@pytest.fixture
def eval_windows(stories):
    from quantkit.data import eval_windows, load_text, tokenize

    return eval_windows(tokenize(stories[1], load_text(str(TINY_TEXT))), 256, max_windows=12)


@pytest.fixture(scope="session")
def tiny_sharded(tmp_path_factory) -> Path:
    """A random bf16 Llama (4 blocks, untied head) saved in 5 safetensors shards with an index,
    with stories260K's tokenizer: for the streaming and resume tests."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("tiny_sharded")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(d, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES / f, d / f)
    return d


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA and the real Triton compiler: skipped (never failed) without
    them, e.g. in CI.  Run them on a GPU machine with ``pytest -m gpu``."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("0", ""):
        return
    why = "needs CUDA" if not torch.cuda.is_available() else "the Triton interpreter is on: run `pytest -m gpu`"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))
