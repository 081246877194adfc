"""HRA (``peft_type: HRA``): the base weight times a chain of ``r`` Householder reflections,
``W (I - 2 u u^T) ...``; merged by PEFT into the base weights."""

from __future__ import annotations

from typing import Any

from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number,
                   check_target_modules, tensor_pattern)
from .tuner import TunerMethod


class Hra(TunerMethod):
    peft_type = "HRA"
    name = "HRA"
    switchable = Capability(False, "Householder reflections multiply the base weight; a switchable graph runs "
                                   "only additive low-rank branches")
    key_pattern = tensor_pattern("hra_u")
    required_parts = ("hra_u",)
    peft_classes = ("HRAConfig", "peft.tuners.hra", "HRALayer")
    summary_fields = ("r", "apply_GS", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 8, integer=True, minimum=1, maximum=MAX_RANK)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return f"r={config.raw.get('r')} targets={config.target_modules}"

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        return (layer.in_features, self.rank_for(config, key.module))


HRA = Hra()
