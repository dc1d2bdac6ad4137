"""Shared fixtures: the real stories260K model (tests/fixtures, MIT) and its TinyStories text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
    from quantkit.modelio import load_model

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
