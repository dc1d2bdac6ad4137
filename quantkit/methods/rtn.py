"""Round-to-nearest: the baseline every calibrated method must beat."""

from __future__ import annotations

from dataclasses import dataclass

from quantkit.calibrate.driver import BlockMethod
from quantkit.methods.base import WeightQuantConfig, check_group_sizes, quantize_block_linears, rtn_linear  # noqa: F401  (rtn_linear: public here too)
from quantkit.registry import register_method


@dataclass(frozen=True)
class RTNConfig(WeightQuantConfig):
    pass


@register_method("rtn", RTNConfig)
class RTN(BlockMethod):
    needs_calibration = False

    def check(self, model, arch):
        check_group_sizes(model, arch, self.config)

    def process_block(self, ctx):
        quantize_block_linears(ctx, rtn_linear, None, self.config.spec_for, activations=self.config.activations())

    def head_quantizer(self):
        """With ``quantize_lm_head``: the head rounded like every other linear."""
        return rtn_linear, None
