"""The block driver: it stops at a block computing NaN/Inf activations, naming it (every statistic
after it would be NaN: GPTQ fell back to RTN on each linear without saying why), and notes a
linear whose grid clipped weights beyond float16's scale range."""

import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantkit import api
from quantkit.cli import cli
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


def test_weights_clipped_by_the_float16_scale_range_are_noted(stories_dir, tmp_path):  # A45
    m = tmp_path / "m"
    shutil.copytree(stories_dir, m)
    t = load_file(str(m / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.weight"][3, 5] = 1e6
    save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})
    r = CliRunner().invoke(cli, ["quantize", str(m), "-o", str(tmp_path / "out"), "--method", "rtn", "--bits", "4",
                                 "--group-size", "-1"])
    assert r.exit_code == 0, r.output
    note = "weights beyond float16's scale range: 1 group scale(s) clamped at 65504"
    assert f"note model.layers.0.self_attn.q_proj: {note}" in " ".join(r.output.split())
    rows = [row for row in (tmp_path / "out" / "quant_log.csv").read_text().splitlines() if note in row]
    assert len(rows) == 1 and rows[0].startswith("0,model.layers.0.self_attn.q_proj,")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["gptq", "awq", "sparsegpt"])
def test_gpu_and_cpu_compression_agree(stories_dir, calib_ids, method):
    """On a GPU (``--device cuda``): the model stays in CPU memory, each block visits the GPU, and
    the result matches the CPU run's within float noise (codes and grids), on the CPU afterwards."""
    import torch

    from quantkit.checkpoint.formats import load_model

    opts = {"sparsity": 0.5} if method == "sparsegpt" else {"bits": 4, "group_size": -1}
    runs = {}
    for device in ("cpu", "cuda"):
        model, _ = load_model(str(stories_dir))
        runs[device] = (model, api.compress(model, method, opts, calib_ids=calib_ids, device=device))
        assert all(p.device.type == "cpu" for p in model.parameters())
    (m_cpu, r_cpu), (m_gpu, r_gpu) = runs["cpu"], runs["cuda"]
    assert r_cpu.quantized.keys() == r_gpu.quantized.keys()
    for name, a in r_cpu.quantized.items():
        b = r_gpu.quantized[name]
        assert b.q.device.type == "cpu"
        assert (a.q != b.q).float().mean() < 0.01, name
        torch.testing.assert_close(b.scales, a.scales, rtol=1e-3, atol=1e-6)
    for (n, a), b in zip(m_cpu.named_parameters(), m_gpu.parameters()):  # norms and embeddings (AWQ scales them)
        if not n.endswith("proj.weight"):  # a linear's weight moves a whole grid step where a code flips
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=n)
