import json
from pathlib import Path

import pytest
import torch
from torch import nn

from quantkit import api
from quantkit.distill import check_pair, check_student_kinds, check_tokenizers, distill, kd_loss, save_student
from quantkit.errors import QuantkitError
from quantkit.models.paths import read_quantization_config
from quantkit.checkpoint.formats import load_model
from quantkit.runtime.lowrank import LowRankLinear
from quantkit.runtime.qlinear import QuantLinear
from quantkit.runtime.sparse import SparseLinear

STORIES = Path(__file__).parent / "fixtures" / "stories260K"


def _train_ids(tok, tiny_text, n=64, seqlen=64, seed=0):
    from quantkit.data import calibration_samples

    return calibration_samples(tok, str(tiny_text), n, seqlen, seed)


def _block_linears(model):
    return {n: m for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}


def test_kd_loss_basics():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 4, 11, generator=g)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(3, 4, 11, generator=g)
    assert kd_loss(s, t).item() > 0
    p, q = torch.softmax(t / 2, -1), torch.log_softmax(s / 2, -1)
    expected = (p * (p.log() - q)).sum(-1).mean() * 4
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kd_loss_decreases_on_tiny_lowrank_student(stories, calib_ids, tiny_text):
    teacher, tok = stories
    student, _ = load_model(str(STORIES))
    api.compress(student, "svd", {"ratio": 0.5}, calib_ids=calib_ids)
    ids = _train_ids(tok, tiny_text)
    heldout = _train_ids(tok, tiny_text, n=8, seed=1)
    u0 = student.model.layers[0].mlp.up_proj.u.detach().clone()
    rep = distill(teacher, student, ids, steps=30, batch_size=4, lr=2e-3, heldout=heldout)
    assert rep["heldout_kd_after"] < 0.8 * rep["heldout_kd_before"]
    assert rep["kd_last"] < rep["kd_first"]
    up = student.model.layers[0].mlp.up_proj
    assert isinstance(up, LowRankLinear) and up.rank == u0.shape[0] and not torch.equal(up.u, u0)
    assert not any(p.requires_grad for p in student.parameters())


def test_sparsity_masks_intact_after_distillation(tmp_path, stories, tiny_text):
    teacher, tok = stories
    student, _ = load_model(str(STORIES))
    masks = {}
    with torch.no_grad():  # magnitude-prune every block linear to 50%
        for name, lin in _block_linears(student).items():
            w = lin.weight
            thresh = w.abs().flatten().kthvalue(w.numel() // 2).values
            w.masked_fill_(w.abs() <= thresh, 0)
            masks[name] = w == 0
    before = {n: lin.weight.detach().clone() for n, lin in _block_linears(student).items()}
    rep = distill(teacher, student, _train_ids(tok, tiny_text, n=32), steps=10, batch_size=4, lr=1e-3, hidden_mse=0.5)
    assert rep["masked_weights"] >= sum(int(m.sum()) for m in masks.values())
    save_student(student, tok, tmp_path / "kd", None)
    assert read_quantization_config(tmp_path / "kd") is None  # a float student stays a plain checkpoint
    loaded, _ = load_model(str(tmp_path / "kd"))
    for name, lin in _block_linears(loaded).items():
        assert torch.equal(lin.weight == 0, masks[name]), name  # the same zeros, and only those
        assert not torch.equal(lin.weight, before[name])  # ...while the kept weights were trained


def test_quantized_student_keeps_its_grid(tmp_path, stories, tiny_text):
    teacher, tok = stories
    student, _ = load_model(str(STORIES))
    res = api.compress(student, "rtn", {"bits": 4, "group_size": -1})
    api.save(student, tok, tmp_path / "q", "rtn", res)
    student, _ = load_model(str(tmp_path / "q"))
    qcfg = read_quantization_config(tmp_path / "q")
    grids = {n: (m.scales.clone(), m.codes().clone()) for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    heldout = _train_ids(tok, tiny_text, n=8, seed=1)
    rep = distill(teacher, student, _train_ids(tok, tiny_text), steps=30, batch_size=4, lr=2e-3, heldout=heldout)
    assert rep["heldout_kd_after"] < rep["heldout_kd_before"]
    save_student(student, tok, tmp_path / "qkd", qcfg)
    loaded, _ = load_model(str(tmp_path / "qkd"))
    changed = 0
    for name, (scales, codes) in grids.items():
        m = loaded.get_submodule(name)
        assert isinstance(m, QuantLinear) and torch.equal(m.scales, scales)  # the grid is kept
        changed += int((m.codes() != codes).sum())
    assert changed > 0  # straight-through training moved weights across grid points
    assert read_quantization_config(tmp_path / "qkd") == qcfg


def test_nm_sparse_student_stays_packed_with_its_pattern(stories, tiny_text):
    from quantkit.models.arch import set_module

    teacher, tok = stories
    student, _ = load_model(str(STORIES))
    for name, lin in _block_linears(student).items():
        w = lin.weight.detach()
        g = w.reshape(w.shape[0], -1, 4)
        keep = g.abs().topk(2, dim=-1).indices
        mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)
        set_module(student.model.layers, name, SparseLinear.from_dense((g * mask).reshape_as(w), 2, 4))
    before = {n: m.dense_weight().clone() for n, m in student.named_modules() if isinstance(m, SparseLinear)}
    distill(teacher, student, _train_ids(tok, tiny_text, n=16), steps=4, batch_size=4, lr=1e-3)
    for name, w0 in before.items():
        m = student.get_submodule(name)
        assert isinstance(m, SparseLinear)
        w = m.dense_weight()
        assert torch.equal(w == 0, w0 == 0) and not torch.equal(w, w0)


def test_checks_refuse_what_cannot_be_distilled():
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    check_tokenizers(Tok({"a": 0}), Tok({"a": 0}))
    with pytest.raises(QuantkitError, match="tokenizer"):
        check_tokenizers(Tok({"a": 0}), Tok({"b": 0}))
    with pytest.raises(QuantkitError, match="w8a8"):
        check_student_kinds({"modules": {"x": {"kind": "w8a8"}, "y": {"kind": "lowrank", "rank": 2}}})

    class M:
        def __init__(self, layers, hidden):
            self.config = type("C", (), {"num_hidden_layers": layers, "hidden_size": hidden})()

    check_pair(M(2, 8), M(1, 8))  # logits only: any shape
    with pytest.raises(QuantkitError, match="hidden"):
        check_pair(M(2, 8), M(1, 8), hidden_weight=1.0)


def test_cli_distill_lowrank_student(tmp_path, stories, calib_ids, tiny_text):
    from click.testing import CliRunner

    from quantkit.cli import cli

    model, tok = stories
    res = api.compress(model, "asvd", {"ratio": 0.5}, calib_ids=calib_ids)
    api.save(model, tok, tmp_path / "student", "asvd", res)
    out = tmp_path / "kd"
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(STORIES), "--student", str(tmp_path / "student"), "-o", str(out),
                                 "--data", str(tiny_text), "--steps", "6", "--seqlen", "64", "--lr", "1e-3", "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout.strip().splitlines()[-1])
    assert payload["student_format"] == "quantkit packed" and payload["steps"] == 6
    assert payload["heldout_kd_after"] < payload["heldout_kd_before"]
    assert read_quantization_config(out)["modules"] == read_quantization_config(tmp_path / "student")["modules"]
    loaded, _ = load_model(str(out))
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, LowRankLinear)
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(STORIES), "--student", str(tmp_path / "student"), "-o", str(out),
                                 "--data", str(tiny_text), "--steps", "2"])
    assert r.exit_code != 0 and "exists" in r.output
