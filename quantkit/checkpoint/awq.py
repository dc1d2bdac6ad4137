"""Import of AWQ-format checkpoints (AutoAWQ's "GEMM" layout, as transformers, vLLM and
AutoAWQ read and write them) into quantkit's runtime:

* ``qweight`` int32 ``[in, out / 8]``: eight 4-bit codes per word, packed along the *output*
  dimension in AutoAWQ's interleaved order: nibble ``i`` (bits ``4i..4i+3``) of word ``c``
  holds output column ``8c + AWQ_ORDER[i]`` (:func:`quantkit.pack.int32.unpack_awq`);
* ``qzeros`` int32 ``[in / group, out / 8]``: the integer zero points, packed the same way
  (stored as they are, unlike GPTQ v1's ``z - 1``);
* ``scales`` float16 ``[in / group, out]``; ``bias`` float16 ``[out]``;
* ``W[n, k] = (q[k, n] - z[k // group, n]) * s[k // group, n]``;
* ``quantization_config``: ``{"quant_method": "awq", "version": "gemm", "bits": 4,
  "group_size": 128, "zero_point": true}`` (AutoAWQ's own ``quant_config.json`` names them
  ``w_bit`` and ``q_group_size``).  ``zero_point: false`` (GPTQModel's default AWQ) is the
  symmetric grid: its ``qzeros`` hold 8 everywhere, or are absent (then 8 is implied).

Each linear becomes an asymmetric :class:`~quantkit.runtime.qlinear.QuantLinear` holding the
same codes, zeros and scales, so the loaded model computes exactly the checkpoint's weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantkit.checkpoint.gptq import load_with_quant_linears
from quantkit.core.quant import symmetric_zero
from quantkit.errors import QuantkitError
from quantkit.pack.int32 import unpack_awq


def awq_settings(qcfg: dict) -> tuple[int, int]:
    """``(bits, group_size)`` of a GEMM-layout AWQ ``quantization_config``; refuses the others."""
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise QuantkitError(f"AWQ checkpoints in the {version!r} layout are not supported (only 'gemm')")
    try:
        bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
        group_size = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
    except (TypeError, ValueError):
        raise QuantkitError(f"AWQ quantization_config has a non-integer bits or group_size: {qcfg}") from None
    if group_size < 1 and group_size != -1:
        raise QuantkitError(f"AWQ quantization_config has group_size {group_size}")
    if bits != 4:
        raise QuantkitError(f"AWQ GEMM checkpoints are 4-bit; this one says {bits}")
    return bits, group_size


def import_awq(directory: str | Path, dtype: torch.dtype = torch.float32):
    """Load an AutoAWQ GEMM-format checkpoint into quantkit's runtime."""
    from transformers import AutoConfig

    from quantkit.runtime.qlinear import QuantLinear

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    qc = config.quantization_config
    qcfg = dict(qc if isinstance(qc, dict) else qc.to_dict())
    if qcfg.get("quant_method") != "awq":
        raise QuantkitError(f"{directory} is not an AWQ checkpoint")
    bits, gs = awq_settings(qcfg)

    def build(name, state, dtype):
        qweight, scales = state.pop(f"{name}.qweight"), state.pop(f"{name}.scales")
        qzeros = state.pop(f"{name}.qzeros", None)
        if qzeros is None and qcfg.get("zero_point", True):
            raise QuantkitError(f"{name}: the AWQ checkpoint has zero points (zero_point: true) but no {name}.qzeros")
        bias = state.pop(f"{name}.bias", None)
        codes = unpack_awq(qweight).t().contiguous()  # [in, out] -> [out, in]
        out_f, in_f = codes.shape
        group = in_f if gs == -1 else gs
        if qzeros is not None:
            zeros = unpack_awq(qzeros).t().float()  # [G, out] -> [out, G]
        else:  # zero_point: false without qzeros: the symmetric grid's implicit zero, 2^(bits-1)
            zeros = torch.full((out_f, in_f // group), float(symmetric_zero(bits)))
        if in_f % group or scales.shape != (in_f // group, out_f) or zeros.shape != (out_f, in_f // group):
            raise QuantkitError(f"{name}: AWQ tensors qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                                f"scales {tuple(scales.shape)} do not fit group size {gs}")
        sym = bool((zeros == symmetric_zero(bits)).all())  # GPTQModel's default AWQ (zero_point: false) stores 8s
        return QuantLinear.from_codes(codes.to(torch.uint8), scales.t().float(), zeros, bits, gs, sym=sym,
                                      bias=bias, dtype=dtype)

    return load_with_quant_linears(directory, config, build, dtype)
