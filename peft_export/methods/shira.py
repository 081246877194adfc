"""SHiRA (``peft_type: SHIRA``): a sparse update of ``r * (in + out)`` trained entries of the base weight at fixed
positions (``shira_indices``, integers saved with the adapter); merged by PEFT into the base weights."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorInfo, TensorKey, check_number,
                   check_target_modules, tensor_pattern)
from .tuner import TunerMethod


class Shira(TunerMethod):
    peft_type = "SHIRA"
    name = "SHiRA"
    switchable = Capability(False, "a sparse update at scattered positions is not a low-rank branch")
    key_pattern = tensor_pattern("shira_weight", "shira_indices")
    required_parts = ("shira_weight", "shira_indices")
    index_parts = ("shira_indices",)
    peft_classes = ("ShiraConfig", "peft.tuners.shira", "ShiraLayer")
    summary_fields = ("r", "mask_type", "random_seed", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 32, integer=True, minimum=1, maximum=MAX_RANK)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return f"r={config.raw.get('r')} targets={config.target_modules}"

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        entries = int(config.raw.get("r", 32)) * (layer.in_features + layer.out_features)
        return (entries,) if key.part == "shira_weight" else (2, entries)

    def check_indices(self, config: AdapterConfig, where: Any, key: TensorKey, info: TensorInfo,
                      layer: BaseLayer) -> None:
        """Row 0 holds output rows, row 1 input columns of the base weight: each must lie inside it (PEFT would
        otherwise fail inside a sparse tensor, or, with negative values, write into the wrong entries)."""
        for axis, (low, high) in enumerate(info.row_ranges or ()):
            size = layer.weight_shape[axis]
            if low < 0 or high >= size:
                what = "output rows" if axis == 0 else "input columns"
                raise ConfigError(
                    f"{where}: tensor {key.key!r} holds {what} {low}..{high}, outside the base layer "
                    f"{key.module!r} (weight {layer.weight_shape}: 0..{size - 1}); the file is corrupt or was "
                    "made for another base")


SHIRA = Shira()
