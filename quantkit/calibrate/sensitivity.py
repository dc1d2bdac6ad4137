"""What rounding each linear costs the model, and the formats a bit budget buys (``--target-bpw``).

:func:`fisher_statistics` runs the calibration windows forward and backward once (the next-token
loss; gradients of the activations only, no weight gradients) and keeps, per linear, the mean
squared input of each column ``h[j] = mean_t x_tj^2`` and the summed squared loss gradient of each
output ``f[o] = sum_t (dL/dy_to)^2``.  Rounding the weight ``W`` to ``W + D`` then grows the loss
by about ``1/2 sum_t (g_t . D x_t)^2 ~= 1/2 sum_o f[o] sum_j h[j] D[o, j]^2`` (Gauss-Newton, with
inputs and gradients taken independent and columns uncorrelated: a diagonal Fisher, comparable
across layers): :func:`rounding_cost`.  :func:`plan_bits` prices every candidate format of every
linear that way (round-to-nearest on min-max grids), optionally re-prices the promising ones with
the method's own result on the full input Hessian (:func:`hessian_cost`: GPTQ compensates much of
the rounding error, more in some linears than in others), and lets
:func:`quantkit.core.budget.allocate` choose; the method then quantizes each linear in its format.

    >>> config, report = plan_bits(model, arch, config, calib_ids)   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.core.budget import allocate, candidate_specs, check_fits, stored_bytes
from quantkit.core.quant import QuantSpec, dequantize, quantize_rtn
from quantkit.errors import QuantkitError
from quantkit.models.arch import ArchSpec, get_module, weight_out_in

log = logging.getLogger("quantkit")


def fisher_statistics(model: nn.Module, names: list[str], embeddings: str, calib_ids: torch.Tensor,
                      progress: Callable[[int, int, str], None] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (f [out], h [in])}`` for the linears ``names`` of ``model`` over ``calib_ids``
    (``[n, seq]``, one window at a time); ``embeddings``: the input embedding's module name
    (its output is where the gradients start).  The model's parameters are left as they were."""
    stats = {n: [None, None, 0] for n in names}  # f, sum of x^2, tokens
    handles = []

    def watch(name):
        def hook(module, args, out):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = stats[name]
            s[1] = (x * x).sum(0) if s[1] is None else s[1] + (x * x).sum(0)
            s[2] += x.shape[0]

            def grad(g):
                g2 = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
                s[0] = g2 if s[0] is None else s[0] + g2
            if out.requires_grad:
                out.register_hook(grad)
        return hook

    for n in names:
        handles.append(get_module(model, n).register_forward_hook(watch(n)))
    handles.append(get_module(model, embeddings).register_forward_hook(
        lambda m, a, out: out.detach().requires_grad_(True)))  # gradients start here: no weight needs one
    grads = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    try:
        for p in grads:
            p.requires_grad_(False)
        with torch.enable_grad():
            for i in range(calib_ids.shape[0]):
                ids = calib_ids[i:i + 1].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
                loss.backward()
                if progress is not None:
                    progress(i + 1, calib_ids.shape[0], "sensitivity")
    finally:
        for h in handles:
            h.remove()
        for p, g in grads.items():
            p.requires_grad_(g)
    out = {n: (s[0], s[1] / max(s[2], 1)) for n, s in stats.items() if s[0] is not None}
    missing = [n for n in names if n not in out]
    out.update(sibling_statistics(out, missing))
    missing = [n for n in names if n not in out]
    if missing:
        raise QuantkitError(f"no loss gradient reached {missing[0]} (and {len(missing) - 1} more): cannot price its formats")
    return out


_EXPERT = re.compile(r"^(.*\.experts)\.\d+\.(.+)$")


def sibling_statistics(stats: dict, missing: list[str]) -> dict:
    """For each expert linear in ``missing`` (no calibration token was routed to its expert): the
    mean statistics of the same linear in the block's other experts, logged by name."""
    out = {}
    for name in missing:
        m = _EXPERT.match(name)
        siblings = [v for n, v in stats.items() if m and (s := _EXPERT.match(n)) and s.groups() == m.groups()]
        if siblings:
            out[name] = tuple(torch.stack([v[i] for v in siblings]).mean(0) for i in range(2))
            log.warning("%s: no calibration token reached its expert: its formats are priced with its sibling experts' "
                        "statistics", name)
    return out


def rounding_cost(w: torch.Tensor, spec: QuantSpec, f: torch.Tensor, h: torch.Tensor) -> float:
    """Estimated loss growth of rounding ``w [out, in]`` to ``spec`` (round-to-nearest): see the module docstring."""
    q, s, z = quantize_rtn(w, spec)
    d = dequantize(q, s, z, spec.groups_for(w.shape[1])) - w.float()  # [out, in]
    return 0.5 * float(f.double() @ (d.double().pow(2) @ h.double()))


def hessian_cost(w: torch.Tensor, w_hat: torch.Tensor, f: torch.Tensor, H: torch.Tensor) -> float:
    """Estimated loss growth of replacing ``w [out, in]`` by ``w_hat``, the method's own result
    (GPTQ's error feedback included): ``1/2 sum_o f[o] d_o H d_o^T`` with ``d = w_hat - w`` and
    ``H [in, in]`` the inputs' mean ``x x^T`` (its diagonal is :func:`fisher_statistics`' ``h``, so
    the two costs are on one scale; correlated columns are priced as they add up)."""
    d = (w_hat.float() - w.float()).double()
    return 0.5 * float(f.double() @ ((d @ H.double()) * d).sum(1))


Reprice = Callable[[dict, dict], dict]  # (options, statistics) -> options: see plan_bits


def plan_bits(model: nn.Module, arch: ArchSpec, config, calib_ids: torch.Tensor, names: list[str],
              g_idx: bool = False, progress: Callable[[int, int, str], None] | None = None,
              reprice: Reprice | None = None) -> tuple[object, dict]:
    """The formats ``config.target_bpw`` buys for the linears ``names`` (full module names, the
    ones the method quantizes): ``(config with one override per linear, report)``.  Linears the
    user's ``overrides`` name keep that format (and count in the budget); ``g_idx``: the method
    stores one per linear (its bytes count too).  ``report``: the allocation, per module.

    Every candidate is first priced by :func:`rounding_cost`; ``reprice(options, stats)``, when
    given, returns better prices for the linears it can (``{name: [(spec, bytes, cost)]}``, from
    ``options`` = the same for every linear and ``stats`` = ``{name: (f, h)}``): GPTQ's repricer
    (:func:`quantkit.calibrate.pricing.hessian_prices`) prices its formats with GPTQ itself on each
    block's Hessian (:func:`hessian_cost`)."""
    if calib_ids is None:
        raise QuantkitError("--target-bpw measures each linear's sensitivity on calibration data: give --calib")
    names = [n for n in names if config.spec_for(n) is not None]
    if not names:
        raise QuantkitError("--target-bpw has no linear to allocate bits to: every one is ignored")
    stats = fisher_statistics(model, names, arch.embeddings[0], calib_ids, progress)
    options, weights = {}, {}
    for n in names:
        w = weight_out_in(get_module(model, n), arch.transposed and n != arch.lm_head).detach().float()  # the head: nn.Linear
        out_f, in_f = w.shape
        f, h = stats[n]
        spec = config.spec_for(n)
        specs = [spec] if config.sets_format(n) else [
            s for s in candidate_specs(in_f, spec.sym) if not (config.act_bits and s.bits == 8 and not s.sym)]
        options[n] = [(s, stored_bytes(s, out_f, in_f, g_idx), rounding_cost(w, s, f, h)) for s in specs]
        weights[n] = out_f * in_f
    check_fits(options, weights, config.target_bpw)  # before the repricing pass, not after it
    repriced = reprice(options, stats) if reprice is not None else {}
    options.update(repriced)
    chosen = allocate(options, weights, config.target_bpw)
    rows, total_bytes = [], 0
    for n in names:
        spec = chosen[n]
        _, nbytes, cost = next(o for o in options[n] if o[0] == spec)
        total_bytes += nbytes
        rows.append({"module": n, "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
                     "bits_per_weight": 8 * nbytes / weights[n], "estimated_cost": cost,
                     "priced_by": "hessian" if n in repriced else "diagonal"})
    overrides = tuple((f"^{re.escape(n)}$", {"bits": chosen[n].bits, "group_size": chosen[n].group_size}) for n in names)
    report = {"target_bpw": config.target_bpw, "bits_per_weight": 8 * total_bytes / sum(weights.values()),
              "estimated_cost": sum(r["estimated_cost"] for r in rows), "modules": rows}
    return dataclasses.replace(config, overrides=config.overrides + overrides), report
