"""HiRA (``peft_type: HIRA``): a Hadamard product of the base weight with a low-rank matrix, ``W + W * (B A)``;
merged by PEFT into the base weights."""

from __future__ import annotations

from typing import Any

from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number, check_target_modules,
                   tensor_pattern)
from .tuner import TunerMethod


class Hira(TunerMethod):
    peft_type = "HIRA"
    name = "HiRA"
    switchable = Capability(False, "its update multiplies the base weight element-wise, which is not low-rank")
    key_pattern = tensor_pattern("hira_A", "hira_B")
    required_parts = ("hira_A", "hira_B")
    peft_classes = ("HiraConfig", "peft.tuners.hira", "HiraLayer")
    summary_fields = ("r", "rank_pattern", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 32, integer=True, minimum=1, maximum=MAX_RANK)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return f"r={config.raw.get('r')} targets={config.target_modules}"

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        r = self.rank_for(config, key.module, default=32)
        return (r, layer.in_features) if key.part == "hira_A" else (layer.out_features, r)


HIRA = Hira()
