"""``--device``: one reading for every command (quantkit.devices); asking for a GPU that is not
there is a one-line error before any work."""

import pytest
import torch
from click.testing import CliRunner

from quantkit.cli import cli
from quantkit.devices import resolve_device
from quantkit.errors import QuantkitError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected and resolve_device(None) == expected


@pytest.mark.parametrize("name", ["tpu", "gpu0", "mps", ""])
def test_unknown_devices_are_refused(name):
    if name == "":
        assert resolve_device(name) == resolve_device("auto")
        return
    with pytest.raises(QuantkitError, match="device"):
        resolve_device(name)


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line(name):
    with pytest.raises(QuantkitError, match=r"use --device cpu") as e:
        resolve_device(name)
    assert "\n" not in str(e.value)


@no_cuda
@pytest.mark.parametrize("command", [["quantize", "--method", "rtn"], ["run", "RECIPE"], ["eval", "perplexity"],
                                     ["generate"], ["bench"]])
def test_commands_refuse_cuda_before_any_work(command, stories_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - {method: rtn, bits: 4, group_size: -1}\n")
    args = [a if a != "RECIPE" else str(recipe) for a in command] + [str(stories_dir)]
    if command[0] == "generate":
        args.append("hello")
    if command[0] in ("quantize", "run"):
        args += ["-o", str(tmp_path / "out")]
    r = CliRunner().invoke(cli, args + ["--device", "cuda"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "--device cuda" in r.output and "use --device cpu" in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_quantize_and_evaluate_on_cuda(stories_dir, tiny_text, tmp_path):
    """The CLI end to end on a GPU: GPTQ with --device cuda, then perplexity on the GPU and on the
    CPU of that checkpoint (within 0.5%), and greedy text from it on the GPU."""
    import json

    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["quantize", str(stories_dir), "-o", str(out), "--method", "gptq", "--bits", "4",
                                 "--group-size", "-1", "--calib", str(tiny_text), "--nsamples", "8", "--seqlen", "128",
                                 "--device", "cuda", "--json"])
    assert r.exit_code == 0, r.output
    ppl = {}
    for device in ("cuda", "cpu"):
        r = CliRunner().invoke(cli, ["eval", "perplexity", str(out), "--dataset", str(tiny_text), "--seqlen", "128",
                                     "--max-windows", "8", "--device", device, "--json"])
        assert r.exit_code == 0, r.output
        ppl[device] = json.loads(r.output)["perplexity"]
    assert abs(ppl["cuda"] - ppl["cpu"]) / ppl["cpu"] < 0.005
    r = CliRunner().invoke(cli, ["generate", str(out), "Once upon a time", "--max-new-tokens", "8", "--device", "cuda", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["completion_tokens"] > 0, r.output
