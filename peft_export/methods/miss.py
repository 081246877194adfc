"""MiSS (``peft_type: MISS``): a shard of trained rows shared across the base weight's blocks (default, ``bat`` and
``mini`` layouts); merged by PEFT into the base weights."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number, check_target_modules,
                   tensor_pattern)
from .tuner import TunerMethod


class Miss(TunerMethod):
    peft_type = "MISS"
    name = "MiSS"
    switchable = Capability(False, "its shared shard is expanded over the whole weight, not a low-rank branch")
    key_pattern = tensor_pattern("miss_block")
    required_parts = ("miss_block",)
    peft_classes = ("MissConfig", "peft.tuners.miss", "MissLayer")
    summary_fields = ("r", "mini_r", "init_weights", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 64, integer=True, minimum=1, maximum=MAX_RANK)
        check_number(raw, where, "mini_r", 1, integer=True, minimum=1, maximum=MAX_RANK)
        if raw.get("init_weights", True) not in (True, False, "bat", "mini"):
            raise ConfigError(f"{where}: 'init_weights' must be true, false, 'bat' or 'mini', found "
                              f"{raw['init_weights']!r}")
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return f"r={config.raw.get('r')} layout={config.raw.get('init_weights', True)} targets={config.target_modules}"

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        r = self.rank_for(config, key.module, default=64)
        layout = config.raw.get("init_weights", True)
        if layout == "bat":
            return (layer.out_features // r, r, r)
        if layout == "mini":
            return (r, int(config.raw.get("mini_r", 1)))
        return (r, layer.out_features)


MISS = Miss()
