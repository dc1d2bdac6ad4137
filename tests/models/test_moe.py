"""quantkit.models.moe: mixture-of-experts families as per-expert linears that every method
quantizes or prunes, saved, reloaded and run on the low-bit kernels; experts the calibration misses."""

import json
import logging

import pytest
import torch
import transformers

from quantkit import api
from quantkit.checkpoint.formats import load_model
from quantkit.errors import QuantkitError
from quantkit.core.rotation import online_transforms
from quantkit.models.arch import arch_for, get_module
from quantkit.models.moe import Experts, unfuse_experts
from quantkit.runtime.qlinear import QuantLinear
from quantkit.testing import MOE_FAMILIES, tiny_moe

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))
W4 = {"bits": 4, "group_size": 16}
CALIB4 = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(2))  # enough tokens to price experts by GPTQ


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_unfused_experts_compute_and_save_what_transformers_does(family, tmp_path):
    from quantkit.checkpoint.packed import save_checkpoint
    from quantkit.models.safetensors import read_header, read_tensor

    model = tiny_moe(family)
    model.save_pretrained(tmp_path / "theirs")
    ref = _logits(model)
    assert unfuse_experts(model) == 2 and unfuse_experts(model) == 0  # once per block, then a no-op
    assert isinstance(model.model.layers[0].mlp.experts, Experts)
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in model.state_dict()  # each expert's own tensors
    (tmp_path / "ours").mkdir()
    save_checkpoint(model, None, tmp_path / "ours", None)  # a float checkpoint: named as transformers writes it
    a, b = (read_header(tmp_path / d / "model.safetensors") for d in ("theirs", "ours"))
    assert a.keys() == b.keys() and all(torch.equal(read_tensor(a[k]), read_tensor(b[k])) for k in a)
    names = arch_for(model).linear_names()
    assert {"mlp.experts.0.gate_proj", "mlp.experts.3.down_proj"} <= set(names)
    assert not any(n.endswith(("mlp.gate", "mlp.router")) for n in names)  # routers stay float


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gptq_quantizes_saves_reloads_and_evaluates(family, tmp_path):
    from quantkit.eval.perplexity import perplexity

    model = tiny_moe(family)
    ref = _logits(model)
    result = api.compress(model, "gptq", {**W4, "expert_min_tokens": 0}, calib_ids=CALIB, progress=False)
    assert sum(".experts." in n for n in result.quantized) == 2 * 4 * 3  # every expert's three linears
    api.save(model, None, tmp_path / "q", "gptq", result)
    loaded, _ = load_model(str(tmp_path / "q"), with_tokenizer=False)
    experts = loaded.model.layers[1].mlp.experts
    assert isinstance(experts, Experts) and all(isinstance(e.down_proj, QuantLinear) for e in experts)
    got = _logits(loaded)
    assert torch.equal(got, _logits(model))  # reloaded == in memory
    assert 0 < (got - ref).abs().max() < ref.abs().max()  # quantized, not broken
    ppl = perplexity(loaded, IDS)["perplexity"]
    assert 1 < ppl < 1e4
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # through quantkit's registered quantizer
    assert torch.equal(_logits(theirs), got)
    counts = json.loads((tmp_path / "q" / "expert_tokens.json").read_text())
    assert sum(counts["model.layers.0.mlp.experts"]) == CALIB.numel() * loaded.config.num_experts_per_tok


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_rotated_gptq_on_experts_saves_and_reloads_with_every_experts_transform(family, tmp_path):
    """--rotate on a mixture of experts: every expert's down_proj gets its online transform, recorded
    and re-attached on reload (the reloaded model computes what the one in memory does), and the
    rotation helps rather than breaks: the rotated W4 model stays near the float one."""
    model = tiny_moe(family)
    ref = _logits(model)
    result = api.compress(model, "gptq", {**W4, "expert_min_tokens": 0, "rotate": True}, calib_ids=CALIB, progress=False)
    online = result.extra["rotation"]["online"]
    assert sorted(online) == sorted(f"model.layers.{i}.mlp.experts.{e}.down_proj" for i in range(2) for e in range(4))
    api.save(model, None, tmp_path / "q", "gptq", result)
    loaded, _ = load_model(str(tmp_path / "q"), with_tokenizer=False)
    assert all(online_transforms(get_module(loaded, name)) for name in online)
    got, mine = _logits(loaded), _logits(model)
    # the same up to rounding (the reload runs the online transform in C, the model in memory in torch)
    assert (got - mine).abs().max() < 1e-5 * mine.abs().max()
    assert 0 < (got - ref).abs().max() < 0.5 * ref.abs().max()


@pytest.mark.parametrize("method,options", [("awq", W4), ("rtn", W4), ("sparsegpt", {"sparsity": 0.5}),
                                            ("wanda", {"pattern": "2:4"})])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_other_methods_work_on_experts(family, method, options, tmp_path):
    model = tiny_moe(family)
    result = api.compress(model, method, options, calib_ids=CALIB, progress=False)
    expert = model.model.layers[0].mlp.experts[1]
    if method in ("awq", "rtn"):
        assert "model.layers.0.mlp.experts.1.up_proj" in result.quantized
    else:  # pruned: the zeros in the expert's weight, then saved in transformers' own layout
        w = expert.gate_proj.weight
        assert (w == 0).float().mean() == pytest.approx(0.5, abs=0.02)
        api.save(model, None, tmp_path / "p", method, result)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
        torch.testing.assert_close(_logits(theirs), _logits(model), rtol=1e-5, atol=1e-5)


def _starved_model():
    """A gpt-oss whose router never picks expert 3 (a bias of -1e4 on its logit)."""
    model = tiny_moe("gpt_oss")
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.router.bias[3] = -1e4
    return model


def test_an_expert_without_calibration_tokens_is_named_and_falls_back(caplog):
    model = _starved_model()
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        result = api.compress(model, "gptq", {**W4, "expert_min_tokens": 1}, calib_ids=CALIB, progress=False)
    tokens = result.extra["expert_tokens"]["model.layers.0.mlp.experts"]
    assert tokens[3] == 0 and min(tokens[:3]) > 0 and sum(tokens) == CALIB.numel() * 2
    notes = {r.module: r.note for r in result.log}
    starved = "model.layers.0.mlp.experts.3.gate_proj"
    assert "expert routed 0 calibration token(s) (< 1;" in notes[starved] and notes[starved].endswith("RTN")
    assert caplog.text.count("model.layers.0.mlp.experts.3:") == 1  # once per expert, by name
    assert "calibration token" not in notes["model.layers.0.mlp.experts.0.gate_proj"]


def test_all_experts_gives_every_expert_its_own_statistics():
    routed, everyone = _starved_model(), _starved_model()
    ref = _logits(routed)
    a = api.compress(routed, "gptq", W4, calib_ids=CALIB, progress=False)
    b = api.compress(everyone, "gptq", {**W4, "all_experts": True}, calib_ids=CALIB, progress=False)
    name = "model.layers.0.mlp.experts.3.gate_proj"
    assert "calibration token" not in {r.module: r.note for r in b.log}[name]
    assert not torch.equal(a.quantized[name].q, b.quantized[name].q)  # GPTQ on its own Hessian, not RTN
    assert b.extra["expert_tokens"]["model.layers.0.mlp.experts"][3] == 0  # the router's choices are still counted
    torch.testing.assert_close(_logits(everyone), _logits(routed), rtol=0.5, atol=0.5)  # the output stays routed
    assert (_logits(everyone) - ref).abs().max() < ref.abs().max()


def test_pruning_falls_back_to_magnitude_for_a_starved_expert():
    result = api.compress(_starved_model(), "wanda", {"sparsity": 0.5}, calib_ids=CALIB, progress=False)
    note = {r.module: r.note for r in result.log}["model.layers.1.mlp.experts.3.down_proj"]
    assert "calibration token" in note and note.endswith("magnitude")


def test_quantized_experts_run_on_the_int4_kernel(monkeypatch):
    from quantkit.kernels import cpu as cpu_kernels

    model = tiny_moe("qwen3_moe", experts=8, top_k=2)
    api.compress(model, "rtn", {"bits": 4, "group_size": 32}, pack=True, progress=False)
    model = model.to(torch.bfloat16)  # the CPU kernels' activations
    real, hits = cpu_kernels.cpu_int4_matmul, []
    monkeypatch.setattr(cpu_kernels, "cpu_int4_matmul", lambda x, w, bias=None: hits.append(id(w)) or real(x, w, bias))
    with torch.no_grad():
        model(IDS[:1, :1])  # one token: top_k experts of each block
    experts = [m for b in model.model.layers for e in b.mlp.experts for m in (e.gate_proj, e.up_proj, e.down_proj)]
    prepared = [m for m in experts if getattr(m, "_kernel_weight", None) is not None]  # the experts that ran
    if not isinstance(prepared[0]._kernel_weight, cpu_kernels.CpuInt4Weight):
        pytest.skip("no int4 CPU kernel on this machine")
    ran = [m for m in experts if id(getattr(m, "_kernel_weight", None)) in hits]
    assert ran == prepared and len(ran) == 2 * 2 * 3  # blocks x experts per token x linears, each on the int4 kernel


@pytest.mark.parametrize("family,dense", [("deepseek_v3", {"first_k_dense_replace": 1}), ("qwen2_moe", {"mlp_only_layers": [1]})])
def test_dense_blocks_among_moe_blocks(family, dense, tmp_path):
    model = tiny_moe(family, **dense)
    d = 0 if family == "deepseek_v3" else 1  # the dense block
    result = api.compress(model, "gptq", {**W4, "expert_min_tokens": 0}, calib_ids=CALIB, progress=False)
    assert f"model.layers.{d}.mlp.gate_proj" in result.quantized  # its plain MLP
    assert f"model.layers.{1 - d}.mlp.experts.3.down_proj" in result.quantized and list(result.extra["expert_tokens"]) == [
        f"model.layers.{1 - d}.mlp.experts"]
    api.save(model, None, tmp_path / "q", "gptq", result)
    loaded, _ = load_model(str(tmp_path / "q"), with_tokenizer=False)
    assert torch.equal(_logits(loaded), _logits(model))


def test_a_model_with_fused_experts_is_named_not_run_blind():
    with pytest.raises(QuantkitError, match="fused module; quantkit.models.moe.unfuse_experts"):
        arch_for(tiny_moe("mixtral"))


def test_expert_min_tokens_is_checked():
    with pytest.raises(QuantkitError, match="expert_min_tokens"):
        api.make_config("gptq", {"expert_min_tokens": -1})


def _moe_dir(tmp_path, stories_dir, family="qwen3_moe"):
    """A float MoE checkpoint with stories260K's tokenizer (vocabulary 512)."""
    import shutil

    model = tiny_moe(family, vocab_size=512)
    model.save_pretrained(tmp_path / "moe")
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(stories_dir / f, tmp_path / "moe" / f)
    return tmp_path / "moe"


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # the lean forward, and transformers' (attention sinks)
def test_generate_on_a_quantized_moe(family, tmp_path, stories_dir):
    from quantkit.runtime.generate import SamplingParams, encode_prompt, generate

    model, tok = load_model(str(_moe_dir(tmp_path, stories_dir, family)))
    api.compress(model, "rtn", W4, pack=True, progress=False)
    params = SamplingParams(max_new_tokens=8)
    g = generate(model, tok, encode_prompt(tok, "Once upon"), params)
    assert len(g.token_ids) == 8
    assert g.token_ids == generate(model, tok, encode_prompt(tok, "Once upon"), params, lean=False).token_ids


def test_cli_reports_experts_and_all_experts(tmp_path, stories_dir, tiny_text):
    from click.testing import CliRunner

    from quantkit.cli import cli

    src = _moe_dir(tmp_path, stories_dir)
    args = ["quantize", src, "-o", tmp_path / "q", "--method", "gptq", "--bits", "4", "--group-size", "16", "--calib", tiny_text,
            "--nsamples", "4", "--seqlen", "16", "--json"]
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    experts = json.loads(r.stdout.strip().splitlines()[-1])["experts"]
    assert experts["count"] == 8 and experts["tokens_max"] >= experts["tokens_min"] >= 0
    assert "experts: 8 in 2 blocks" in r.stderr
    r = CliRunner().invoke(cli, [str(a) for a in args[:3] + [tmp_path / "q2"] + args[4:] + ["--all-experts"]])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["experts"]["fell_back"] == []


@pytest.mark.parametrize("family,method,options", [("qwen3_moe", "gptq", W4), ("mixtral", "awq", W4),  # Mixtral: w1/w2/w3 stored
                                                   ("deepseek_v3", "wanda", {"sparsity": 0.5})])
def test_stream_writes_what_memory_writes(family, method, options, tmp_path, stories_dir, tiny_text):
    from quantkit.models.safetensors import read_header, read_tensor

    src = _moe_dir(tmp_path, stories_dir, family)
    calib = dict(calib=str(tiny_text), nsamples=4, seqlen=16, progress=False)
    model, tok = load_model(str(src))
    api.save(model, tok, tmp_path / "mem", method, api.compress(model, method, options, tokenizer=tok, **calib))
    api.compress_streaming(src, tmp_path / "st", method, options, **calib)
    a, b = (read_header(tmp_path / d / "model.safetensors") for d in ("mem", "st"))
    assert a.keys() == b.keys() and all(torch.equal(read_tensor(a[k]), read_tensor(b[k])) for k in a)
    assert (tmp_path / "mem" / "expert_tokens.json").read_text() == (tmp_path / "st" / "expert_tokens.json").read_text()


def test_stream_refuses_experts_stored_fused(tmp_path, stories_dir):
    with pytest.raises(QuantkitError, match="cannot stream .*experts.*quantize it without --stream"):
        api.compress_streaming(_moe_dir(tmp_path, stories_dir, "gpt_oss"), tmp_path / "st", "rtn", W4, progress=False)


def test_experts_another_library_compressed_save_under_their_own_names():
    """compressed-tensors replaces a linear's weight by its packed tensors: gpt-oss's fused layout is not written then."""
    from quantkit.models.moe import float_checkpoint_state

    model = tiny_moe("gpt_oss")
    unfuse_experts(model)
    lin = model.model.layers[0].mlp.experts[2].up_proj
    del lin.weight
    lin.register_parameter("weight_packed", torch.nn.Parameter(torch.zeros(4, dtype=torch.int32), requires_grad=False))
    names = float_checkpoint_state(model, model.state_dict()).keys()
    assert "model.layers.0.mlp.experts.2.up_proj.weight_packed" in names
    assert "model.layers.0.mlp.experts.gate_up_proj" not in names and "model.layers.1.mlp.experts.gate_up_proj" in names


def test_float_experts_in_a_quantized_checkpoint_load_everywhere(tmp_path):
    model = tiny_moe("gpt_oss")  # its float checkpoints store experts fused; a quantized one, per expert
    result = api.compress(model, "rtn", {**W4, "ignore": (r"experts\.",)}, progress=False)
    api.save(model, None, tmp_path / "q", "rtn", result)
    ours, _ = load_model(str(tmp_path / "q"), with_tokenizer=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(ours), _logits(model))
    torch.testing.assert_close(_logits(theirs), _logits(model), rtol=1e-6, atol=1e-6)  # same weights, another memory layout


def test_starved_experts_under_awq_smoothquant_and_a_bit_budget(caplog):
    awq = api.compress(_starved_model(), "awq", {**W4, "expert_min_tokens": 0}, calib_ids=CALIB, progress=False)
    assert "AWQ: not scaled (expert routed 0" in {r.module: r.note for r in awq.log}["model.layers.0.mlp.experts.3.gate_proj"]
    sq = api.compress(_starved_model(), "smoothquant", {"act_quant": "static", "expert_min_tokens": 0}, calib_ids=CALIB,
                      progress=False)
    assert sq.quantized["model.layers.0.mlp.experts.3.up_proj"].act_scale is None  # per token at run time
    assert sq.quantized["model.layers.0.mlp.experts.0.up_proj"].act_scale > 1e-4
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        budget = api.compress(_starved_model(), "gptq", {**W4, "target_bpw": 3.5}, calib_ids=CALIB4, progress=False)
    assert budget.extra["allocation"]["bits_per_weight"] <= 3.5
    assert "model.layers.0.mlp.experts.3.gate_proj: no calibration token reached its expert" in caplog.text
    priced = {r["module"]: r["priced_by"] for r in budget.extra["allocation"]["modules"]}  # rounded to nearest: priced so
    assert priced["model.layers.0.mlp.experts.3.gate_proj"] == "diagonal"
    assert "hessian" in {v for k, v in priced.items() if ".experts." in k}  # experts with tokens enough for their width
    everyone = api.compress(_starved_model(), "gptq", {**W4, "target_bpw": 3.5, "all_experts": True}, calib_ids=CALIB4,
                            progress=False)  # GPTQ on every token: priced by it
    assert {r["priced_by"] for r in everyone.extra["allocation"]["modules"] if ".experts." in r["module"]} == {"hessian"}


def test_one_token_is_weighed_as_a_batch_of_tokens():
    experts = tiny_moe("mixtral").to(torch.bfloat16)
    unfuse_experts(experts)
    mlp = experts.model.layers[0].mlp
    x = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        together = mlp(x)
        alone = torch.cat([mlp(x[i:i + 1]) for i in range(2)])
    assert torch.equal(together, alone)


def test_moe_decode_is_not_captured_in_a_cuda_graph():
    from quantkit.runtime.lean import LeanLM

    model = tiny_moe("qwen3_moe")
    unfuse_experts(model)
    assert not LeanLM(model, 16).graphable  # experts are chosen on the host each token
