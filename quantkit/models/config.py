"""The values of a model config that would make every forward pass NaN (or build a model with no
context), refused before a model is built from it: one set of rules, :func:`check_config`,
called wherever quantkit builds a model from a config (float load, streamed skeleton, packed and
imported checkpoints).

    >>> check_config(AutoConfig.from_pretrained("m"))   # doctest: +SKIP
    QuantkitError: model config rms_norm_eps = nan: must be a finite number > 0
"""

from __future__ import annotations

import math

from quantkit.errors import QuantkitError

POSITIVE_INTS = ("max_position_embeddings", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
MAX_VALUES, MAX_DEPTH = 1_000_000, 32  # a config holds a few hundred values, a few levels deep: a hostile one is not walked further


def check_config(config) -> None:
    """Refuse a config (a transformers ``PretrainedConfig`` or its dict) holding, at any depth:

    * a NaN or infinite float (a NaN inside a list too; an infinite list item is a bound, e.g.
      Mamba2's ``time_step_limit = (0.0, inf)``);
    * a norm epsilon (``*_eps``, ``*_epsilon``) that is not > 0, or a ``rope_theta`` that is not > 0
      (both make the forward NaN: RMSNorm divides by ``sqrt(eps)`` on a zero row, rope raises 0 to
      negative powers);
    * an integer ``max_position_embeddings``, ``hidden_size``, ``num_attention_heads``,
      ``num_key_value_heads`` or ``vocab_size`` below 1.
    """
    values = config.to_dict() if hasattr(config, "to_dict") else config
    stack, seen = [("", values, False, 0)], 0
    while stack and seen < MAX_VALUES:  # iterative: a deep config is no RecursionError
        path, value, in_list, depth = stack.pop()
        seen += 1
        if isinstance(value, dict) and depth < MAX_DEPTH:
            stack.extend((f"{path}.{k}" if path else str(k), v, False, depth + 1) for k, v in value.items())
        elif isinstance(value, (list, tuple)) and depth < MAX_DEPTH:
            stack.extend((f"{path}[{i}]", v, True, depth + 1) for i, v in enumerate(value))
        else:
            _check_value(path, value, in_list)


def _check_value(path: str, value, in_list: bool) -> None:
    key = path.rsplit(".", 1)[-1]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    finite = not isinstance(value, float) or math.isfinite(value)  # an int is (math.isfinite would overflow on a huge one)
    if key.endswith(("_eps", "_epsilon")) or key == "rope_theta":
        if finite and value > 0:
            return
        rule = "must be a finite number > 0"
    elif not finite and (math.isnan(value) or not in_list):
        rule = "must be a finite number"
    elif key in POSITIVE_INTS and isinstance(value, int) and value < 1:
        rule = "must be at least 1"
    else:
        return
    raise QuantkitError(f"model config {path} = {value!r}: {rule}")
