"""The block driver stops at a block computing NaN/Inf activations, naming it (every statistic
after it would be NaN: GPTQ fell back to RTN on each linear without saying why)."""

import pytest

from quantkit import api
from quantkit.errors import QuantkitError


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_block_computing_nan_stops_calibration(stories, calib_ids, method):
    model, _ = stories
    model.model.layers[1].input_layernorm.variance_epsilon = float("nan")  # what rms_norm_eps NaN did (A23g)
    blocks_done = []
    with pytest.raises(QuantkitError, match=r"^block model\.layers\.1 computes NaN/Inf activations on the calibration data"):
        api.compress(model, method, dict(bits=4, group_size=-1), calib_ids=calib_ids[:2],
                     progress=lambda i, n, info: blocks_done.append(i))
    assert blocks_done == [1]  # block 0 was compressed; block 1 stopped at its first forward


def test_finite_blocks_run_through(stories, calib_ids):
    model, _ = stories
    res = api.compress(model, "gptq", dict(bits=4, group_size=-1), calib_ids=calib_ids[:2])
    assert len(res.quantized) == 35 and not any("fell back" in r.note for r in res.log)
