"""The serving tests' model: stories260K, loaded once per test module, decoding on one thread."""

from pathlib import Path

import pytest
import torch

FIXTURE = str(Path(__file__).resolve().parents[1] / "fixtures" / "stories260K")


@pytest.fixture(scope="module")
def model_tok():
    from quantkit.checkpoint.formats import load_model

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(FIXTURE)
    torch.set_num_threads(old)
