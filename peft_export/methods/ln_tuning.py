"""LN tuning (``peft_type: LN_TUNING``): trained copies of normalisation layers (their weight and bias); merged by
PEFT, which puts the trained copy in place of the base layer."""

from __future__ import annotations

import re
from typing import Any

from .base import AdapterConfig, BaseLayer, Capability, TensorKey, check_target_modules
from .tuner import TunerMethod

WEIGHT, BIAS = "ln_tuning_layers.weight", "ln_tuning_layers.bias"


class LnTuning(TunerMethod):
    peft_type = "LN_TUNING"
    name = "LN tuning"
    switchable = Capability(False, "it replaces whole normalisation layers, and a switchable graph shares every "
                                   "module outside its low-rank branches")
    key_pattern = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>ln_tuning_layers\.(?:weight|bias))$")
    required_parts = (WEIGHT,)  # a bias only where the base layer has one (RMSNorm has none)
    layer_kinds = "normalisation layers (LayerNorm, RMSNorm)"
    peft_classes = ("LNTuningConfig", "peft.tuners.ln_tuning.layer", "LNTuningLayer")
    summary_fields = ("target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_target_modules(raw, where)

    def supports_layer(self, layer: BaseLayer) -> bool:
        return layer.weight_shape is not None and len(layer.weight_shape) == 1

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        return layer.weight_shape


LN_TUNING = LnTuning()
