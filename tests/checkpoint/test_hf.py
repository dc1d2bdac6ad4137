"""transformers' ``from_pretrained`` loads quantkit checkpoints after ``import quantkit`` (the
registered quantizer, quantkit.checkpoint.hf; ecosystem audit F4) with quantkit's runtime modules,
and ``save_pretrained`` writes a checkpoint both load again (F5)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantkit import api
from quantkit.checkpoint.formats import load_model
from quantkit.runtime.backends import use_backend

KINDS = {  # every kind of module a checkpoint holds, and a rotated one with online transforms
    "rtn-w4": ("rtn", {"bits": 4, "group_size": -1, "sym": False}),
    "gptq-w3-actorder": ("gptq", {"bits": 3, "group_size": -1, "act_order": True}),
    "w8a8": ("smoothquant", {"alpha": 0.5}),
    "sparse-2:4": ("sparsegpt", {"pattern": "2:4", "packed": True}),
    "lowrank": ("asvd", {"ratio": 0.5}),
    "rotated-w4a8": ("rtn", {"bits": 4, "group_size": -1, "rotate": True, "act_bits": 8}),
}


FIX = Path(__file__).resolve().parents[1] / "fixtures"


def _make(kind, tmp_path):
    from quantkit.data import calibration_samples

    method, opts = KINDS[kind]
    model, tok = load_model(str(FIX / "stories260K"))
    ids = calibration_samples(tok, str(FIX / "tinystories.txt"), nsamples=4, seqlen=64, seed=0)
    out = tmp_path / kind
    api.save(model, tok, out, method, api.compress(model, method, opts, calib_ids=ids))
    return out


def _logits(model, ids):
    with torch.no_grad(), use_backend("reference"):
        return model(ids).logits


@pytest.mark.parametrize("kind", list(KINDS))
def test_from_pretrained_equals_quantkit_loader_and_round_trips(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = _make(kind, tmp_path)
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    ours, _ = load_model(str(ckpt))
    theirs = AutoModelForCausalLM.from_pretrained(str(ckpt))
    assert {type(m).__name__ for m in theirs.modules()} >= {type(m).__name__ for m in ours.modules()} - {"Dummy"}
    ref = _logits(ours, ids)
    torch.testing.assert_close(_logits(theirs, ids), ref, rtol=0, atol=1e-5)
    for model, name in ((theirs, "from-hf"), (ours, "from-quantkit")):  # F5: both save and reload
        model.save_pretrained(tmp_path / name)
        again, _ = load_model(str(tmp_path / name), with_tokenizer=False)
        torch.testing.assert_close(_logits(again, ids), ref, rtol=0, atol=1e-5)
        qcfg = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        assert qcfg["quant_method"] == "quantkit" and qcfg["modules"].keys() == \
            json.loads((ckpt / "config.json").read_text())["quantization_config"]["modules"].keys()


@pytest.mark.parametrize("order", ["quantkit first", "transformers first"])
def test_fresh_process_after_import_quantkit(order, tmp_path):
    """In a new process: ``import quantkit`` (before or after transformers) is all it takes, and
    importing quantkit alone loads neither torch nor transformers."""
    ckpt = _make("rtn-w4", tmp_path)
    imports = "import quantkit; import transformers" if order == "quantkit first" else "import transformers; import quantkit"
    code = (f"import sys; import quantkit as q0; light = 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            f"{imports}; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            f"print(light, type(m.model.layers[0].mlp.down_proj).__name__)")
    p = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-2:] == ["True", "QuantLinear"]


def test_without_import_quantkit_transformers_would_load_random_weights(tmp_path):
    """Why the registration matters: the same load without quantkit gives no QuantLinear (and
    transformers warns about an unknown quantization type)."""
    ckpt = _make("rtn-w4", tmp_path)
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); print(type(m.model.layers[0].mlp.down_proj).__name__)")
    p = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, timeout=300)
    assert p.stdout.split()[-1:] != ["QuantLinear"]


def test_bf16_stored_checkpoint_computes_like_quantkit_in_float32(tmp_path):
    """A checkpoint whose floats are stored in bf16 (a bf16 or GGUF source), loaded in float32 by
    both: the norms and embeddings are widened alike, the float16 scales stay float16."""
    from transformers import AutoModelForCausalLM

    model, tok = load_model(str(FIX / "stories260K"), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16"), tok.save_pretrained(tmp_path / "bf16")
    model, tok = load_model(str(tmp_path / "bf16"), dtype=torch.float32)
    api.save(model, tok, tmp_path / "ck", "rtn", api.compress(model, "rtn", {"bits": 4, "group_size": -1}, progress=False))
    ours, _ = load_model(str(tmp_path / "ck"))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ck"), dtype=torch.float32)
    assert theirs.model.norm.weight.dtype == torch.float32 and theirs.model.layers[0].mlp.down_proj.scales.dtype == torch.float16
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), rtol=0, atol=1e-5)
