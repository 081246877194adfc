"""RoAd (``peft_type: ROAD``): a learned 2D rotation and scale of each pair of output channels (``road_1``,
``road_2`` or ``road_4`` parameters per pair, in groups of ``group_size``); merged by PEFT into the base weights."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import AdapterConfig, BaseLayer, Capability, TensorKey, check_number, check_target_modules, tensor_pattern
from .tuner import TunerMethod

# Parameters per output channel of each variant (road_theta and road_alpha each).
PER_CHANNEL = {"road_1": 0.5, "road_2": 1, "road_4": 2}


class Road(TunerMethod):
    peft_type = "ROAD"
    name = "RoAd"
    switchable = Capability(False, "its rotation multiplies the base layer's output, and a switchable graph has "
                                   "only additive low-rank branches")
    key_pattern = tensor_pattern("road_theta", "road_alpha")
    required_parts = ("road_theta", "road_alpha")
    peft_classes = ("RoadConfig", "peft.tuners.road", "RoadLayer")
    summary_fields = ("variant", "group_size", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        if raw.get("variant", "road_1") not in PER_CHANNEL:
            raise ConfigError(f"{where}: 'variant' must be one of {', '.join(PER_CHANNEL)}, found {raw['variant']!r}")
        check_number(raw, where, "group_size", 64, integer=True, minimum=2, maximum=1 << 20)
        if raw.get("group_size", 64) % 2:
            raise ConfigError(f"{where}: 'group_size' must be even, found {raw['group_size']!r}")
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return (f"variant={config.raw.get('variant', 'road_1')} group_size={config.raw.get('group_size', 64)} "
                f"targets={config.target_modules}")

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        return (int(layer.out_features * PER_CHANNEL[config.raw.get("variant", "road_1")]),)


ROAD = Road()
