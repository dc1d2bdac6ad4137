"""Side-by-side comparison of checkpoints against their original, in one run.

For each checkpoint: size on disk, bits per weight of its linear layers, perplexity and its
delta against the original, the mean KL divergence of its next-token distributions from the
original's (as ``llama-perplexity --kl-divergence`` reports), and decode tokens/s.

    >>> rows = compare_models({"original": base, "gptq-w4": q4}, windows, reference="original")
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.eval.perplexity import finite_perplexity


def linear_storage(model: nn.Module) -> tuple[int, int]:
    """``(bytes, weights)`` of the model's linear layers inside its blocks, packed or float."""
    from quantkit.models.arch import arch_for

    arch = arch_for(model)
    nbytes = nweights = 0
    for block in arch.blocks(model):
        for name, mod in block.named_modules():
            if not name or any(True for _ in mod.children()):
                continue
            if hasattr(mod, "weight_bytes") and hasattr(mod, "in_features"):
                nbytes += mod.weight_bytes()
                nweights += mod.in_features * mod.out_features
            elif isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
                nbytes += mod.weight.numel() * mod.weight.element_size()
                nweights += mod.weight.numel()
    return nbytes, nweights


def pareto_front(rows: list[dict], x: str, y: str) -> list[dict]:
    """The rows no other row beats on both ``x`` and ``y`` (smaller is better for both), by ``x``."""
    front = []
    for r in sorted(rows, key=lambda r: (r[x], r[y])):
        if not front or r[y] < front[-1][y]:
            front.append(r)
    return front


@torch.no_grad()
def compare_models(models: dict[str, nn.Module], windows: torch.Tensor, reference: str) -> dict[str, dict]:
    """Perplexity and KL divergence (vs ``models[reference]``) of each model over ``windows``."""
    stats = {name: {"nll": 0.0, "kl": 0.0, "top1": 0} for name in models}
    count = 0
    for w in windows:
        ids = w.unsqueeze(0)
        ref_logp = None
        logps = {}
        for name, model in models.items():
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # [seq-1, vocab]
            logps[name] = F.log_softmax(logits, dim=-1)
        ref_logp = logps[reference]
        target = ids[0, 1:]
        for name, lp in logps.items():
            stats[name]["nll"] += float(-lp.gather(1, target.unsqueeze(1)).sum())
            # KL(P_ref || P_model) per token, summed
            stats[name]["kl"] += float((ref_logp.exp() * (ref_logp - lp)).sum())
            stats[name]["top1"] += int((lp.argmax(-1) == ref_logp.argmax(-1)).sum())
        count += target.numel()
    out = {}
    for name, s in stats.items():
        out[name] = {"perplexity": finite_perplexity(s["nll"] / count, name), "kl_divergence": s["kl"] / count,
                     "same_top1": s["top1"] / count, "tokens": count}
    return out


def decode_tokens_per_s(model: nn.Module, prompt_len: int = 32, gen_len: int = 16) -> float:
    """Greedy decode speed, batch 1 (a short run; ``quantkit bench`` measures properly)."""
    from quantkit.eval.speed import time_generation

    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    time_generation(model, prompt, 2)  # warm-up: backends convert weights on their first call
    _, decode_s = time_generation(model, prompt, gen_len)
    return gen_len / decode_s


def disk_bytes(path: str) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) + sum(f.stat().st_size for f in p.glob("*.bin"))
