"""Batch-invariant decode attention: a row of a left-padded batch attends as it would alone.

The server decodes many sequences in one forward (:mod:`quantkit.serve.engine`): their KV cache
rows are left-padded to a common length and an attention mask hides the padding.  transformers'
SDPA attention then runs one kernel call over the padded batch, and with a mask it also lays the
grouped-query heads out differently than without one, so a row's output depends on how long the
other rows are: by float rounding (~1e-6), which the bf16 activations of the int4 kernels turn
into logit changes of ~4e-2, enough to flip greedy near-ties (reliability audit, E35).

:func:`use_row_attention` switches a model from ``sdpa`` to :func:`row_sdpa_attention`, which runs
a one-position step over a left-padded batch as one SDPA call per row, on that row's unpadded keys
and values and without a mask: the very call a sequence alone makes.  Every other call (prefill, a
step without padding, a mask that is not left padding) goes to SDPA unchanged, so the switch
changes no other result.

    >>> use_row_attention(model)     # True: a padded decode step now computes row by row
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ROW_SDPA = "quantkit_row_sdpa"


def unpadded_lengths(mask: torch.Tensor, batch: int) -> list[int] | None:
    """Keys each row attends to, when ``mask`` ``[batch, 1, 1, T]`` (boolean, or additive with 0
    where allowed) is left padding (every row allows a suffix of its columns); else None."""
    if mask.dim() != 4 or mask.shape[0] != batch or mask.shape[1] != 1 or mask.shape[2] != 1:
        return None
    allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0, 0]  # [B, T]
    n = allowed.sum(-1)  # [B]
    t = allowed.shape[-1]
    if not torch.equal(allowed, torch.arange(t, device=mask.device)[None, :] >= (t - n)[:, None]):
        return None
    return n.tolist()


def row_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention; a one-position step over a left-padded batch runs row by row.

    ``query [B, H, 1, D]``, ``key``/``value [B, H_kv, T, D]``, ``attention_mask [B, 1, 1, T]``."""
    lengths = None
    if query.shape[2] == 1 and attention_mask is not None:
        lengths = unpadded_lengths(attention_mask, query.shape[0])
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    t = key.shape[2]
    rows = [sdpa_attention_forward(module, query[b:b + 1], key[b:b + 1, :, t - n:], value[b:b + 1, :, t - n:], None,
                                   **kwargs)[0] for b, n in enumerate(lengths)]
    return torch.cat(rows), None


def use_row_attention(model) -> bool:
    """Switch ``model`` (a transformers model on ``sdpa`` attention) to :func:`row_sdpa_attention`;
    whether it runs it now (False for another attention implementation, left as it is)."""
    if model.config._attn_implementation == ROW_SDPA:
        return True
    if model.config._attn_implementation != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(ROW_SDPA, row_sdpa_attention)
    AttentionMaskInterface.register(ROW_SDPA, sdpa_mask)  # the masks sdpa gets
    model.set_attn_implementation(ROW_SDPA)
    return model.config._attn_implementation == ROW_SDPA
