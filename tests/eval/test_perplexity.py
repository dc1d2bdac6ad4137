"""A perplexity that is not finite is an error, never a result (nor ``NaN`` in JSON)."""

import math
import re

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.eval.perplexity import finite_perplexity, perplexity

NOT_FINITE = "perplexity is not finite (NaN): the model computes NaN/Inf logits on this data"


def test_a_model_computing_nan_is_an_error(stories, eval_windows):
    model, _ = stories
    assert math.isfinite(perplexity(model, eval_windows[:2])["perplexity"])
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    seen = []
    with pytest.raises(QuantkitError, match=f"^{re.escape(NOT_FINITE)}$"):
        perplexity(model, eval_windows[:3], progress=lambda i, n, ppl: seen.append(ppl))
    assert seen == []  # stopped at the first window, before any estimate is reported


@pytest.mark.parametrize("mean_nll,message", [(float("nan"), "(NaN)"), (float("inf"), "(Inf)"), (800.0, "(Inf)"),
                                              (710.0, "(Inf)")])
def test_finite_perplexity_refuses_what_exp_cannot_give(mean_nll, message):
    with pytest.raises(QuantkitError, match=f"^m: perplexity is not finite {re.escape(message)}: "):
        finite_perplexity(mean_nll, "m")


def test_finite_perplexity_is_exp_of_the_mean():
    assert finite_perplexity(1.5) == math.exp(1.5) and finite_perplexity(700.0) == math.exp(700.0)
