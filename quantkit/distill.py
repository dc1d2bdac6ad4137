"""Knowledge distillation: train a student to match a teacher's next-token distributions
(Hinton et al., 2015) — mainly to recover a compressed model from its original.

The loss per token is ``T^2 * KL(softmax(t/T) || softmax(s/T))`` on the logits ``t`` (teacher)
and ``s`` (student), plus optionally ``w * mean_l ||h_s^l - h_t^l||^2`` on the hidden states of
every layer (same-shape students only).  Training runs on the CPU in float32 with AdamW, a short
linear warm-up and a cosine decay.

What is trained, by the student's kind of linear (the compressed structure is never lost):

* float linears (and norms): trained; their **exact zeros are sparsity masks** — the gradient
  is masked before each step and the zeros re-applied after it, so a pruned model stays pruned
  with the same mask;
* ``lowrank`` (:class:`~quantkit.runtime.lowrank.LowRankLinear`): both factors are trained, the
  rank stays;
* ``quant`` (:class:`~quantkit.runtime.qlinear.QuantLinear`): a float shadow weight is trained
  through the **fixed grid** (its scales, zero points and act-order map never change) with a
  straight-through estimator: the forward uses the shadow rounded on the grid, the backward
  treats the rounding as identity (Bengio et al., 2013).  At the end the shadow is rounded on
  the same grid and packed again, so a packed student stays packed;
* ``nm_sparse`` (:class:`~quantkit.runtime.sparse.SparseLinear`): trained as a dense weight with
  its N:M mask, packed again at the end;
* input/output embeddings: frozen unless ``train_embeddings`` (the tied head of a small model is
  a fifth of its parameters and of its training step).

Other packed kinds (W8A8 with quantized activations) are refused.

    >>> teacher, tok = load_model("SmolLM2-135M.gguf"); student, _ = load_model("out/smol-asvd80")
    >>> ids = calibration_samples(tok, "c4", 200 * 4, 256)
    >>> report = distill(teacher, student, ids, DistillConfig(steps=200, batch_size=4))
    >>> save_student(student, tok, "out/smol-asvd80-kd", read_quantization_config("out/smol-asvd80"))
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.models.arch import get_module, set_module
from quantkit.checkpoint.output import atomic_output_dir
from quantkit.checkpoint.packed import save_checkpoint
from quantkit.errors import QuantkitError
from quantkit.core.quant import ACT_DEFAULTS, fake_quantize, quantize_codes
from quantkit.runtime.qlinear import QuantLinear
from quantkit.runtime.sparse import SparseLinear

TRAINABLE_KINDS = ("lowrank", "quant", "nm_sparse")


# ---- losses ---------------------------------------------------------------------------
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` on temperature-softened logits ``[..., vocab]``, mean
    over tokens (the ``T^2`` keeps gradients comparable across temperatures, Hinton et al. sec. 2).

        >>> kd_loss(torch.zeros(2, 5), torch.zeros(2, 5)).item()
        0.0
    """
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1).reshape(-1, student_logits.shape[-1])
    p = F.log_softmax(teacher_logits.float() / t, dim=-1).reshape(-1, teacher_logits.shape[-1])
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * (t * t)


def hidden_mse(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over layers of the mean squared difference of hidden states (``[b, seq, d]`` each;
    the embedding output, index 0, is skipped)."""
    pairs = list(zip(student_hidden[1:], teacher_hidden[1:]))
    return sum(F.mse_loss(s.float(), t.float()) for s, t in pairs) / max(len(pairs), 1)


# ---- trainable stand-ins for packed modules --------------------------------------------
class STEQuantLinear(nn.Module):
    """A :class:`QuantLinear` made trainable: float shadow ``weight [out, in]`` on the module's
    fixed grid, rounded in the forward with a straight-through gradient."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        g = q.group_map().long()
        self.bits, self.group_size, self.sym, self.maxq = q.bits, q.group_size, q.sym, 2**q.bits - 1
        self.activations = {k: getattr(q, k) for k in ACT_DEFAULTS}  # kept for the runtime module (training runs float activations)
        self.register_buffer("scales", q.scales.clone())  # [out, n_groups] float16, as stored
        self.register_buffer("zeros", q.zero_points().float())  # [out, n_groups]
        self.register_buffer("g_idx", q.g_idx.clone() if q.g_idx is not None else None)
        self.register_buffer("_scale", q.scales.float()[:, g])  # [out, n_groups] -> [out, in]
        self.register_buffer("_zero", self.zeros[:, g])
        self.weight = nn.Parameter(q.dequantized_weight())  # starts exactly on the grid
        self.bias = nn.Parameter(q.bias.detach().float().clone()) if q.bias is not None else None
        self.dtype = q.bias.dtype if q.bias is not None else torch.float32

    def grid_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self._scale, self._zero, self.maxq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + (self.grid_weight() - self.weight).detach()  # forward: on the grid; backward: identity
        return F.linear(x.to(w.dtype), w, self.bias).to(x.dtype)

    def to_runtime(self) -> QuantLinear:
        """The shadow rounded on the same grid, packed again."""
        codes = quantize_codes(self.weight.detach(), self._scale, self._zero, self.maxq).to(torch.uint8)
        bias = self.bias.detach() if self.bias is not None else None
        return QuantLinear.from_codes(codes, self.scales.float(), self.zeros, self.bits, self.group_size, self.sym,
                                      g_idx=self.g_idx, bias=bias, dtype=self.dtype, **self.activations)


class NMMaskedLinear(nn.Linear):
    """A :class:`SparseLinear` as a dense trainable linear; its zeros are its N:M mask."""

    def __init__(self, s: SparseLinear):
        super().__init__(s.in_features, s.out_features, bias=s.bias is not None)
        self.n, self.m = s.n, s.m
        self.dtype = s.values.dtype
        with torch.no_grad():
            self.weight.copy_(s.dense_weight().float())
            if s.bias is not None:
                self.bias.copy_(s.bias.float())

    def to_runtime(self) -> SparseLinear:
        bias = self.bias.detach() if self.bias is not None else None
        return SparseLinear.from_dense(self.weight.detach(), self.n, self.m, bias=bias, dtype=self.dtype)


_TO_TRAINABLE: dict[type, type] = {QuantLinear: STEQuantLinear, SparseLinear: NMMaskedLinear}


@dataclass
class TrainState:
    params: list[nn.Parameter]
    masks: list[tuple[nn.Parameter, torch.Tensor]]  # (weight, True where it must stay zero)
    swapped: list[str] = field(default_factory=list)  # modules replaced by a trainable stand-in


def prepare_student(model: nn.Module, train_embeddings: bool = False) -> TrainState:
    """Make ``model`` trainable in place (see the module docstring) and collect its masks."""
    swapped = []
    for name, mod in list(model.named_modules()):
        cls = _TO_TRAINABLE.get(type(mod))
        if cls is not None:
            set_module(model, name, cls(mod))
            swapped.append(name)
    for p in model.parameters():
        p.requires_grad_(True)
    if not train_embeddings:
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:
                for p in emb.parameters():
                    p.requires_grad_(False)
    head = model.get_output_embeddings()
    masks = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and mod is not head and mod.weight.requires_grad:
            zero = mod.weight.detach() == 0
            if zero.any():
                masks.append((mod.weight, zero))
    seen, params = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return TrainState(params, masks, swapped)


def export_student(model: nn.Module, state: TrainState) -> None:
    """Put the runtime modules back (re-packed on their own grids / patterns), in place."""
    for name in state.swapped:
        set_module(model, name, get_module(model, name).to_runtime())
    for p in model.parameters():
        p.requires_grad_(False)


# ---- the loop ---------------------------------------------------------------------------
def _lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # cosine down to 10%

    return f


def _forward(model, ids, hidden: bool):
    return model(input_ids=ids, use_cache=False, output_hidden_states=hidden)


def _loss(s_out, t_out, temperature: float, hidden_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    v = min(s_out.logits.shape[-1], t_out.logits.shape[-1])  # padded vocabularies: compare the shared ids
    kd = kd_loss(s_out.logits[..., :v], t_out.logits[..., :v], temperature)
    total = kd
    if hidden_weight:
        total = kd + hidden_weight * hidden_mse(s_out.hidden_states, t_out.hidden_states)
    return total, kd


@torch.no_grad()
def evaluate_kd(teacher, student, ids: torch.Tensor, temperature: float = 1.0, batch_size: int = 4) -> float:
    """Mean KD loss of ``student`` on ``ids [n, seqlen]`` (a fixed held-out batch)."""
    total, n = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size]
        _, kd = _loss(_forward(student, batch, False), _forward(teacher, batch, False), temperature, 0.0)
        total += float(kd) * batch.shape[0]
        n += batch.shape[0]
    return total / max(n, 1)


def check_pair(teacher, student, hidden_weight: float = 0.0) -> None:
    """Refuse a pair that cannot be distilled (hidden MSE needs the teacher's hidden shapes)."""
    if hidden_weight:
        tc, sc = teacher.config, student.config
        t_shape = (getattr(tc, "num_hidden_layers", None), getattr(tc, "hidden_size", None))
        s_shape = (getattr(sc, "num_hidden_layers", None), getattr(sc, "hidden_size", None))
        if t_shape != s_shape:
            raise QuantkitError(f"--hidden-mse needs a student with the teacher's layers and hidden size "
                                f"(teacher {t_shape}, student {s_shape}); use logits only")


def _train_step(teacher, student, batch: torch.Tensor, state: TrainState, opt, sched, temperature: float,
                hidden_weight: float, grad_clip: float) -> tuple[float, float]:
    """One optimizer step on ``batch [b, seqlen]``: ``(loss, kd loss)``."""
    hidden = bool(hidden_weight)
    with torch.no_grad():
        t_out = _forward(teacher, batch, hidden)
    s_out = _forward(student, batch, hidden)
    loss, kd = _loss(s_out, t_out, temperature, hidden_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p, mask in state.masks:  # pruned weights get no update...
        if p.grad is not None:
            p.grad.masked_fill_(mask, 0)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(state.params, grad_clip)
    opt.step()
    sched.step()
    with torch.no_grad():  # ...and stay exactly zero
        for p, mask in state.masks:
            p.masked_fill_(mask, 0)
    return float(loss.detach()), float(kd.detach())


@dataclass
class DistillConfig:
    """Every setting of a distillation run, with its default (the CLI's ``quantkit distill``
    options are generated from these fields)."""

    data: str = field(default="c4", metadata={"help": "Training text: a dataset name or a local file."})
    steps: int = field(default=200, metadata={"help": "Optimizer steps."})
    seqlen: int = field(default=256, metadata={"help": "Tokens per training window."})
    batch_size: int = field(default=4, metadata={"help": "Windows per step."})
    lr: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate (warm-up, cosine decay)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL term."})
    hidden_mse: float = field(default=0.0, metadata={"help": "Weight of the hidden-state MSE term (same-shape students)."})
    warmup: int | None = field(default=None, metadata={"help": "Linear warm-up steps [default: steps / 20]."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient norm clip (0: none)."})
    train_embeddings: bool = field(default=False, metadata={"help": "Also train the input/output embeddings (frozen by default)."})
    seed: int = field(default=0, metadata={"help": "Seed of the training windows (the held-out ones use seed + 1)."})

    def __post_init__(self):
        for name, hi in (("steps", 10_000_000), ("seqlen", 1_048_576), ("batch_size", 1_000_000)):
            v = getattr(self, name)
            if not isinstance(v, int) or not 1 <= v <= hi:
                raise QuantkitError(f"--{name.replace('_', '-')} must be between 1 and {hi}, got {v}")
        if not self.lr > 0 or not self.temperature > 0 or not self.hidden_mse >= 0 or not self.grad_clip >= 0:
            raise QuantkitError("--lr and --temperature must be positive, --hidden-mse and --grad-clip non-negative")
        if self.warmup is not None and self.warmup < 0:
            raise QuantkitError(f"--warmup must be non-negative, got {self.warmup}")


def distill(teacher: nn.Module, student: nn.Module, ids: torch.Tensor, config: DistillConfig | None = None, *,
            heldout: torch.Tensor | None = None, progress: Callable[[int, int, float], None] | None = None,
            **settings) -> dict:
    """Distill ``teacher`` into ``student`` (in place) for ``config.steps`` steps of
    ``config.batch_size`` windows from ``ids [n, seqlen]`` (cycled); ``settings`` override fields
    of ``config`` (``steps=30, lr=2e-3``).  Returns per-step losses, the KD loss on ``heldout``
    before and after, and counts of what was trained and masked."""
    cfg = replace(config or DistillConfig(), **settings)
    steps, batch_size, lr, temperature = cfg.steps, cfg.batch_size, cfg.lr, cfg.temperature
    hidden_weight, grad_clip, warmup = cfg.hidden_mse, cfg.grad_clip, cfg.warmup
    check_pair(teacher, student, hidden_weight)
    t0 = time.perf_counter()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    before = evaluate_kd(teacher, student, heldout, temperature) if heldout is not None else None
    state = prepare_student(student, cfg.train_embeddings)
    if not state.params:
        raise QuantkitError("the student has nothing to train")
    opt = torch.optim.AdamW(state.params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20) if warmup is None else max(1, warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup))
    losses, kd_losses = [], []
    student.train()
    n = ids.shape[0]
    try:
        for step in range(steps):
            idx = torch.arange(step * batch_size, (step + 1) * batch_size) % n
            batch = ids[idx]  # [b, seqlen]
            loss, kd = _train_step(teacher, student, batch, state, opt, sched, temperature, hidden_weight, grad_clip)
            losses.append(loss)
            kd_losses.append(kd)
            if progress is not None:
                progress(step + 1, steps, kd_losses[-1])
    finally:
        student.eval()
        export_student(student, state)
    after = evaluate_kd(teacher, student, heldout, temperature) if heldout is not None else None
    k = max(1, min(10, steps // 4))
    return {
        "steps": steps, "batch_size": batch_size, "seqlen": ids.shape[1], "tokens": steps * batch_size * ids.shape[1],
        "lr": lr, "temperature": temperature, "hidden_mse": hidden_weight,
        "kd_first": sum(kd_losses[:k]) / k, "kd_last": sum(kd_losses[-k:]) / k,
        "heldout_kd_before": before, "heldout_kd_after": after,
        "losses": losses, "kd_losses": kd_losses,
        "trainable_params": sum(p.numel() for p in state.params),
        "masked_weights": sum(int(m.sum()) for _, m in state.masks),
        "seconds": time.perf_counter() - t0,
    }


# ---- I/O --------------------------------------------------------------------------------
def check_tokenizers(teacher_tok, student_tok) -> None:
    """Distillation compares distributions token by token: the vocabularies must be the same."""
    if teacher_tok is None or student_tok is None:
        return
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise QuantkitError("the student's tokenizer differs from the teacher's; distillation compares their "
                            "next-token distributions id by id, so both must share one vocabulary")


def check_student_kinds(qconfig: dict | None) -> None:
    """Refuse a packed student with modules this loop cannot train."""
    if not qconfig:
        return
    kinds = {e.get("kind", "quant") for e in qconfig.get("modules", {}).values()}
    bad = sorted(kinds - set(TRAINABLE_KINDS))
    if bad:
        raise QuantkitError(f"cannot distill into modules of kind {', '.join(bad)} "
                            f"(distillation trains {', '.join(TRAINABLE_KINDS)} and float modules)")


def save_student(student: nn.Module, tokenizer, out: str | Path, qconfig: dict | None, overwrite: bool = False,
                 dtype: torch.dtype | None = None) -> Path:
    """Write the trained student the way it was read: packed with its ``quantization_config``
    (``qconfig``, unchanged: ranks, grids and patterns are preserved) or as a float checkpoint
    in ``dtype`` (its original float dtype)."""
    if qconfig is None and dtype is not None and dtype != torch.float32:
        student.to(dtype)
    with atomic_output_dir(out, overwrite) as tmp:
        save_checkpoint(student, tokenizer, tmp, qconfig)
    return Path(out)

