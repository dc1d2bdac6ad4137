"""Rotation as a step of its own (``quantkit quantize --method rotate``, recipe step ``rotate``):
the residual-stream Hadamard rotation of :mod:`quantkit.core.rotation` and nothing else, so a
recipe can rotate before any method (``[rotate, gptq]`` is ``gptq`` with ``rotate: true``).
Alone it writes a float checkpoint that computes what the original does."""

from __future__ import annotations

from dataclasses import dataclass

from quantkit.calibrate.driver import BlockMethod
from quantkit.methods.base import WeightQuantConfig, like
from quantkit.registry import register_method


@dataclass(frozen=True)
class RotateConfig:
    rotate_seed: int = like(WeightQuantConfig, "rotate_seed")
    online_hadamard: bool = like(WeightQuantConfig, "online_hadamard")

    rotate = True  # what BlockMethod.prepare reads: this method is the rotation


@register_method("rotate", RotateConfig)
class Rotate(BlockMethod):
    needs_calibration = False

    @property
    def stores_results(self) -> bool:
        return False

    def process_block(self, ctx) -> None:
        """Nothing per block: :meth:`BlockMethod.prepare` rotated the whole model."""
