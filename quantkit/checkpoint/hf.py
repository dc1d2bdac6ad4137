"""quantkit checkpoints through transformers' own ``from_pretrained``: a registered quantizer.

After ``import quantkit``, ``AutoModelForCausalLM.from_pretrained(DIR)`` of a checkpoint whose
``quantization_config.quant_method`` is ``quantkit`` builds the model with quantkit's runtime
modules in place of the listed linears (transformers loads the packed tensors into them), checks
the loaded values and attaches a rotation's online transforms, exactly as
:func:`quantkit.checkpoint.packed.load_packed` does: ``generate``, pipelines and
``save_pretrained`` (which writes the same layout back) work on it.  Without the registration
transformers skips an unknown ``quant_method`` and fills every quantized linear with random
weights (ecosystem audit F4).

Registration goes through transformers' public ``register_quantization_config`` /
``register_quantizer``; :func:`register` is idempotent.  ``quantkit/__init__.py`` calls it as soon
as transformers' quantizer table is imported (at once if it already is), so importing quantkit
stays light for the CLI; importing this module registers it.

    >>> import quantkit                                        # doctest: +SKIP
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("out/smollm2-gptq-w4")
"""

from __future__ import annotations

from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from quantkit.checkpoint.packed import FORMAT_VERSION
from quantkit.errors import QuantkitError
from quantkit.models.paths import QUANT_METHOD


class QuantkitConfig(QuantizationConfigMixin):
    """A quantkit ``quantization_config`` as transformers holds it: the dict of config.json, kept
    whole (``to_dict`` gives it back unchanged, so ``save_pretrained`` writes what was read)."""

    def __init__(self, **entries):
        self.quant_method = QUANT_METHOD
        self._entries = {**entries, "quant_method": QUANT_METHOD}
        self.modules = self._entries.get("modules") or {}

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        config = cls(**config_dict)
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict:
        return dict(self._entries)

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def __repr__(self) -> str:
        return f"QuantkitConfig(method={self._entries.get('method')!r}, modules={len(self.modules)})"


class QuantkitHfQuantizer(HfQuantizer):
    """Loads a pre-quantized quantkit checkpoint: runtime modules swapped in on the empty model,
    the packed tensors loaded as they are stored, then checked."""

    requires_calibration = True  # quantkit quantizes with its own commands; transformers only loads

    def validate_environment(self, *args, **kwargs):
        version = self.quantization_config.to_dict().get("format_version", 0)
        if type(version) is not int or version > FORMAT_VERSION:
            raise QuantkitError(f"quantkit format version {version!r}; this quantkit reads up to {FORMAT_VERSION}: "
                                "upgrade quantkit")

    def _process_model_before_weight_loading(self, model, **kwargs):
        from quantkit.models.moe import unfuse_experts
        from quantkit.runtime.swap import swap_in_runtime_modules

        unfuse_experts(model)  # MoE: the per-expert modules the checkpoint stores
        swap_in_runtime_modules(model, self.quantization_config.modules)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # stored already packed

    def _process_model_after_weight_loading(self, model, **kwargs):
        from quantkit.checkpoint.values import check_loaded
        from quantkit.core.rotation import attach_online
        from quantkit.runtime.online import use_native_transforms

        check_loaded(model, getattr(model, "name_or_path", "the checkpoint"))
        rotation = self.quantization_config.to_dict().get("rotation")
        if rotation is not None:
            attach_online(model, rotation)
            use_native_transforms(model)
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make transformers load quantkit checkpoints (idempotent)."""
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return
    register_quantization_config(QUANT_METHOD)(QuantkitConfig)
    register_quantizer(QUANT_METHOD)(QuantkitHfQuantizer)


register()  # importing this module is what registers it (quantkit/__init__.py imports it when transformers' table loads)
