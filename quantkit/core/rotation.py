"""Rotating the residual stream (QuaRot, SpinQuant's Hadamard initialisation): a function-preserving
transform after which weights and activations have no outlier channels, so that they round well
to 2-4 bits.

For an RMSNorm model, ``RMSNorm(x Q) = RMSNorm(x) Q`` for any orthonormal ``Q`` once the norms'
scales are folded into the linears that read them.  So with ``Q`` a randomized Hadamard matrix
(:func:`quantkit.core.hadamard.random_hadamard`):

* every norm's scale goes into the input columns of the linears it feeds (its weight becomes 1),
  the final norm's into the head;
* the token embedding becomes ``E Q``; every linear reading the residual stream (``q/k/v``,
  ``gate/up``, the head) ``W Q``; every linear writing it (``o_proj``, ``down_proj``) ``Q^T W``,
  its bias ``b Q``;
* each head's values ``v H`` (``H`` a Hadamard matrix over ``head_dim``: ``v_proj``'s rows) and
  ``o_proj``'s input columns per head ``W H``, exact offline;
* ``down_proj``'s input (``silu(gate) * up``, not on the residual stream) gets an *online*
  Hadamard transform ``H``: ``down_proj``'s weight becomes ``W H`` and a forward pre-hook
  (:class:`OnlineHadamard`) applies ``x -> x H`` at run time; the runtime re-attaches it from the
  checkpoint's ``quantization_config["rotation"]`` (:func:`attach_online`).

What to rotate is read from the architecture table (:class:`quantkit.models.arch.RotationSpec`).
A mixture of experts rotates like a dense MLP, expert by expert: the norm before it folds into the
router (which stays float) and every expert's gate/up, each expert's down writes ``Q^T W`` and gets
its own online transform.
The rotated float model computes the same function as the original, up to rounding.

    >>> record = rotate_model(model, arch_for(model), seed=0)    # in place; the config's "rotation"
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.core.hadamard import HadamardTransform, random_signs
from quantkit.errors import QuantkitError
from quantkit.models.arch import ArchSpec, get_module, module_or_none, untie_head

ROTATED_ATTR = "_quantkit_rotation"  # set on a model once it is rotated: a second rotation is refused


class OnlineHadamard:
    """A forward pre-hook ``x -> x H`` on a linear's input (``H``: :class:`HadamardTransform` of
    its input size); ``carried`` over when the linear is swapped for its packed module
    (:func:`quantkit.models.arch.set_module`).  ``kernel``, when the runtime sets one
    (:func:`quantkit.runtime.online.use_native_transforms`), computes the same product on a CPU
    float32 input in one call."""

    carried = True

    def __init__(self, n: int):
        self.transform = HadamardTransform(n)
        self.kernel = None  # CPU x [..., n] -> x H (a new float32 tensor), or None: the torch products

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x H`` in ``x``'s dtype, with float32 sums (fp16 sums could overflow)."""
        y = self.kernel(x) if self.kernel is not None and x.device.type == "cpu" else self.transform(x.float())
        return y.to(x.dtype)

    def __call__(self, module: nn.Module, args: tuple):
        return (self.apply(args[0]),) + tuple(args[1:])


def online_transforms(module: nn.Module) -> list[OnlineHadamard]:
    """The online Hadamard hooks on ``module``'s input (the runtime's fused paths, which bypass
    the module's call, must not run a module that has one)."""
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, OnlineHadamard)]


def check_rotatable(model: nn.Module, arch: ArchSpec) -> None:
    """Refuse, before any work, a model the rotation cannot handle."""
    if arch.rotation is None:
        raise QuantkitError(f"cannot rotate a {arch.name} model: {arch.no_rotation}")
    if getattr(model, ROTATED_ATTR, None) is not None:
        raise QuantkitError("the model is rotated already: rotate once (a recipe's rotate step, or --rotate on one step)")
    if getattr(getattr(model, "config", None), "clip_qkv", None):
        raise QuantkitError("cannot rotate a model that clamps q/k/v (clip_qkv): the rotation of each head's values "
                            "does not commute with the clamp")
    if any(p.is_meta for p in model.parameters()):
        raise QuantkitError("a rotation needs the whole model in memory: drop --stream")


def _mul_(param: torch.Tensor, fn) -> None:
    """``param <- fn(param in float64)``, stored in its own dtype."""
    param.data.copy_(fn(param.data.double()).to(param.dtype))


def _present(block: nn.Module, names: tuple[str, ...], arch: ArchSpec) -> list[str]:
    """``names`` for one block: "{e}" repeated for each of the block's experts; in an MoE model a
    name the block lacks is skipped (its dense blocks have no experts, its MoE blocks no dense MLP)."""
    out = []
    for name in names:
        if "{e}" in name:
            experts = module_or_none(block, name.split(".{e}")[0])
            out += [name.replace("{e}", str(e)) for e in range(len(experts) if experts is not None else 0)]
        elif arch.moe is None or module_or_none(block, name) is not None:
            out.append(name)
    return out


def _readers(block: nn.Module, arch: ArchSpec) -> dict[str, list[str]]:
    """``{norm: the linears (and routers) reading its output}`` for one block."""
    readers: dict[str, list[str]] = {}
    for g in arch.groups_in(block):
        if g.prev_kind == "norm":
            readers.setdefault(g.prev, []).extend(g.linears)
    moe = _present(block, arch.rotation.moe_readers, arch)
    experts = [n for n in moe if ".experts." in n]
    plain = [n for n in arch.rotation.moe_readers if "{e}" not in n]
    if experts and not set(plain) <= set(moe):  # a renamed router would be left unrotated: refuse, never guess
        raise QuantkitError(f"cannot rotate this {arch.name} block: it has experts but not {', '.join(sorted(set(plain) - set(moe)))}")
    if moe:
        readers.setdefault(arch.rotation.moe_norm, []).extend(moe)
    return readers


def fold_norms(model: nn.Module, arch: ArchSpec) -> None:
    """Every RMSNorm's scale into the input columns of the linears it feeds; the norm's weight
    becomes the identity (``1``, or ``0`` for Gemma's ``1 + w``)."""
    pairs = []
    for block in arch.blocks(model):
        pairs += [(get_module(block, norm), [get_module(block, n) for n in names]) for norm, names in _readers(block, arch).items()]
    if arch.final_norm:
        pairs.append((get_module(model, arch.final_norm), [get_module(model, arch.lm_head)]))
    for norm, linears in pairs:
        scale = norm.weight.data.double() + arch.norm_offset
        for lin in linears:
            _mul_(lin.weight, lambda w: w * scale.to(w.device))
        norm.weight.data.fill_(1.0 - arch.norm_offset)


def rotate_residual(model: nn.Module, arch: ArchSpec, signs: torch.Tensor) -> None:
    """The residual stream ``x -> x Q``, ``Q = diag(signs) M`` (``M``: :class:`HadamardTransform`,
    applied fast: ``x Q = M(x * signs)``): embedding rows and readers' input columns times ``Q``,
    writers' output rows ``Q^T W = (W^T Q)^T`` (and biases ``b Q``)."""
    t = HadamardTransform(signs.numel())
    rot = lambda w: t(w * signs.to(w.device))  # noqa: E731  (rows times Q)
    _mul_(get_module(model, arch.embeddings[0]).weight, rot)
    _mul_(get_module(model, arch.lm_head).weight, rot)
    for block in arch.blocks(model):
        for name in [n for names in _readers(block, arch).values() for n in names]:
            _mul_(get_module(block, name).weight, rot)
        for name in _present(block, arch.rotation.writers, arch):
            lin = get_module(block, name)
            _mul_(lin.weight, lambda w: rot(w.t()).t())
            if lin.bias is not None:
                _mul_(lin.bias, rot)


def rotate_values(model: nn.Module, arch: ArchSpec) -> None:
    """Each head's values ``v -> v H`` (``H``: Hadamard over ``head_dim``; ``v_proj``'s rows and
    bias per head) and ``o_proj``'s input columns per head ``W H``: attention mixes values within a
    head, so ``o_proj`` sees ``out H`` and the function is unchanged (grouped-query heads share
    their kv head's ``H``, the same for all)."""
    if arch.rotation.values is None:
        return
    v_name, o_name = arch.rotation.values
    cfg = model.config.get_text_config()
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    t = HadamardTransform(hd)
    for block in arch.blocks(model):
        v, o = get_module(block, v_name), get_module(block, o_name)
        # v_proj's rows per head: H^T W_h = (W_h^T H)^T
        _mul_(v.weight, lambda w: t(w.reshape(-1, hd, w.shape[1]).transpose(1, 2)).transpose(1, 2).reshape(w.shape))
        if v.bias is not None:
            _mul_(v.bias, lambda b: t(b.reshape(-1, hd)).reshape(b.shape))
        _mul_(o.weight, lambda w: t(w.reshape(w.shape[0], -1, hd)).reshape(w.shape))


def rotate_model(model: nn.Module, arch: ArchSpec, seed: int = 0, online: bool = True) -> dict:
    """Rotate ``model`` in place (see the module's docstring); returns the record that goes into
    ``quantization_config["rotation"]``: the hidden size, the seed and, with ``online``, each
    linear given an online Hadamard transform with its size."""
    check_rotatable(model, arch)
    hidden = get_module(model, arch.embeddings[0]).weight.shape[1]
    untie_head(model, arch)
    with torch.no_grad():
        fold_norms(model, arch)
        rotate_residual(model, arch, random_signs(hidden, seed))
        rotate_values(model, arch)
        record = {"kind": "hadamard", "hidden_size": hidden, "seed": seed, "online": {}}
        if online:
            for i, block in enumerate(arch.blocks(model)):
                for name in _present(block, arch.rotation.online, arch):
                    lin = get_module(block, name)
                    n = lin.weight.shape[1]
                    _mul_(lin.weight, HadamardTransform(n))  # W H
                    record["online"][f"{arch.blocks_path}.{i}.{name}"] = n
    attach_online(model, record)
    return record


def attach_online(model: nn.Module, record) -> None:
    """Put an :class:`OnlineHadamard` on the input of every linear ``record["online"]`` names
    (a checkpoint's ``quantization_config["rotation"]``, checked against the model first)."""
    online = record.get("online", {}) if isinstance(record, dict) else None
    if not isinstance(online, dict):
        raise QuantkitError("quantization_config.rotation must be a mapping with an 'online' mapping")
    for name, n in online.items():
        try:
            mod = get_module(model, name)
        except QuantkitError:
            raise QuantkitError(f"quantization_config.rotation.online names {name!r}, which the model does not have") from None
        in_f = getattr(mod, "in_features", None)
        if type(n) is not int or n != in_f:
            raise QuantkitError(f"quantization_config.rotation.online[{name!r}] = {n!r}, but that layer takes {in_f} features")
        if not online_transforms(mod):
            mod.register_forward_pre_hook(OnlineHadamard(n))
    setattr(model, ROTATED_ATTR, record)
