"""A packed (quantkit-v1) checkpoint whose values are broken is refused at load, naming the tensor:
NaN/Inf in any float tensor, a ``g_idx`` outside the layer's groups, a zero point off the grid
(GPTQ and AWQ imports: tests/checkpoint/test_import.py)."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantkit import api
from quantkit.checkpoint.formats import load_model
from quantkit.cli import cli
from quantkit.errors import QuantkitError

Q = "model.layers.0.self_attn.q_proj"
FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """stories260K, GPTQ 4-bit asymmetric with groups of 16 and act-order: q_proj stores scales,
    qzeros and g_idx over 4 groups (down_proj, 172 wide, stays float)."""
    model, tok = load_model(str(FIXTURES / "stories260K"))
    res = api.compress(model, "gptq", dict(bits=4, group_size=16, sym=False, act_order=True, static_groups=False,
                                           ignore=("down_proj",)), tokenizer=tok, calib=str(FIXTURES / "tinystories.txt"), nsamples=4, seqlen=64)
    out = tmp_path_factory.mktemp("values") / "ckpt"
    api.save(model, tok, out, "gptq", res)
    return out


def poke(src, dst, name: str, index: int, value):
    """A copy of checkpoint ``src`` at ``dst`` with one entry of tensor ``name`` set to ``value``."""
    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    t[name].view(-1)[index] = value
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_the_intact_checkpoint_loads(packed):
    model, _ = load_model(str(packed), with_tokenizer=False)
    assert model.get_submodule(Q).g_idx is not None and model.get_submodule(Q).qzeros is not None


@pytest.mark.parametrize("name,index,value,message", [
    (f"{Q}.scales", 5, float("nan"), f"{Q}.scales holds 1 NaN/Inf value(s)"),  # F03
    (f"{Q}.scales", 5, float("inf"), f"{Q}.scales holds 1 NaN/Inf value(s)"),  # F04
    ("model.norm.weight", 0, float("nan"), "model.norm.weight holds 1 NaN/Inf value(s)"),
    ("model.embed_tokens.weight", 7, float("-inf"), "model.embed_tokens.weight holds 1 NaN/Inf value(s)"),
    (f"{Q}.g_idx", 5, 1000, f"{Q}.g_idx holds group 1000; the layer has 4 group(s), 0..3"),  # F05
    (f"{Q}.g_idx", 5, -1, f"{Q}.g_idx holds group -1; the layer has 4 group(s), 0..3"),  # F06
    (f"{Q}.qzeros", 5, 255, f"{Q}.qzeros holds zero point 255; a 4-bit grid's zero points lie in 0..15"),  # F11
    (f"{Q}.qzeros", 5, 16, f"{Q}.qzeros holds zero point 16"),
])
def test_broken_values_are_refused_at_load(packed, tmp_path, name, index, value, message):
    bad = poke(packed, tmp_path / "bad", name, index, value)
    with pytest.raises(QuantkitError, match=f"^cannot load {re.escape(str(bad))}: {re.escape(message)}"):
        load_model(str(bad), with_tokenizer=False)


def test_eval_of_a_nan_scale_is_one_error_line(packed, tiny_text, tmp_path):
    bad = poke(packed, tmp_path / "bad", f"{Q}.scales", 5, float("nan"))
    r = CliRunner().invoke(cli, ["eval", "perplexity", str(bad), "--dataset", str(tiny_text), "--seqlen", "64",
                                 "--max-windows", "2", "--json"])
    assert r.exit_code == 1 and "Traceback" not in r.output and "NaN" not in r.stdout.replace("NaN/Inf", "")
    assert r.output.strip().splitlines()[-1] == f"Error: cannot load {bad}: {Q}.scales holds 1 NaN/Inf value(s)"


def test_an_edge_zero_point_and_group_still_load(packed, tmp_path):
    ok = poke(packed, tmp_path / "ok", f"{Q}.qzeros", 5, 15)
    t = load_file(str(ok / "model.safetensors"))
    t[f"{Q}.g_idx"][5] = 3
    save_file(t, str(ok / "model.safetensors"), metadata={"format": "pt"})
    model, _ = load_model(str(ok), with_tokenizer=False)
    assert int(model.get_submodule(Q).qzeros.view(-1)[5]) == 15 and int(model.get_submodule(Q).g_idx[5]) == 3
