"""SuperTuning (``peft_type: SUPERTUNING``): trained values added to a fixed sparse support of the base weight
(``supertuning_indices``, flat positions saved with the adapter as integers; ``int(out * in * (1 - sparsity))`` of
them), plus, where ``r`` is set (its "Supra" variant), a LoRA ``(lora_alpha / r) B A``; merged by PEFT into the base
weights."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorInfo, TensorKey, check_number,
                   check_target_modules, tensor_pattern)
from .tuner import TunerMethod

LORA_PARTS = ("supertuning_lora_A", "supertuning_lora_B")


class Supertuning(TunerMethod):
    peft_type = "SUPERTUNING"
    name = "SuperTuning"
    switchable = Capability(False, "a sparse update at scattered positions is not a low-rank branch")
    key_pattern = tensor_pattern("supertuning_values", "supertuning_indices", *LORA_PARTS)
    required_parts = ("supertuning_values", "supertuning_indices")
    index_parts = ("supertuning_indices",)
    peft_classes = ("SupertuningConfig", "peft.tuners.supertuning", "SupertuningLayer")
    summary_fields = ("sparsity", "select_top", "r", "lora_alpha", "save_precomputed_indices", "target_modules",
                      "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "sparsity", 0.99, minimum=0, maximum=1)
        if raw.get("sparsity", 0.99) == 1:
            raise ConfigError(f"{where}: 'sparsity' must be below 1 (1 leaves no trained entries), found 1")
        if raw.get("r") is not None:
            check_number(raw, where, "r", None, integer=True, minimum=1, maximum=MAX_RANK)
            if raw.get("lora_alpha") is not None:
                check_number(raw, where, "lora_alpha", None)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        raw = config.raw
        lora = f" r={raw['r']}" if raw.get("r") is not None else ""
        return f"sparsity={raw.get('sparsity', 0.99)}{lora} targets={config.target_modules}"

    def tensor_name(self, prefix: str, module: str, part: str) -> str:
        return f"{prefix}{module}.{part}" + (".weight" if part in LORA_PARTS else "")

    def required_parts_for(self, config: AdapterConfig) -> tuple[str, ...]:
        raw = config.raw
        # save_precomputed_indices=False: PEFT recomputes the support from the base weight's magnitudes at load
        parts = self.required_parts if raw.get("save_precomputed_indices", True) else ("supertuning_values",)
        return parts + (LORA_PARTS if raw.get("r") is not None else ())

    def check_tensor_shape(self, config: AdapterConfig, where: Any, key: TensorKey, shape: tuple[int, ...],
                           layer: BaseLayer) -> None:
        if key.part in LORA_PARTS and config.raw.get("r") is None:
            raise ConfigError(f"{where}: tensor {key.key!r} is a LoRA factor but adapter_config.json sets no 'r', "
                              "so PEFT would not load it; the config and the weights disagree (was the config "
                              "edited?)")
        super().check_tensor_shape(config, where, key, shape, layer)

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        if key.part == "supertuning_lora_A":
            return (int(config.raw["r"]), layer.in_features)
        if key.part == "supertuning_lora_B":
            return (layer.out_features, int(config.raw["r"]))
        sparsity = config.raw.get("sparsity", 0.99)
        return (int(layer.out_features * layer.in_features * (1 - sparsity)),)  # PEFT's count, same arithmetic

    def check_indices(self, config: AdapterConfig, where: Any, key: TensorKey, info: TensorInfo,
                      layer: BaseLayer) -> None:
        """Every flat position must lie inside the base weight (PEFT would otherwise fail in scatter_add, or, with
        a negative value, fail or write elsewhere)."""
        if not info.row_ranges:
            return
        low, high = min(r[0] for r in info.row_ranges), max(r[1] for r in info.row_ranges)
        size = layer.out_features * layer.in_features
        if low < 0 or high >= size:
            raise ConfigError(f"{where}: tensor {key.key!r} holds positions {low}..{high}, outside the base layer "
                              f"{key.module!r} (weight {layer.weight_shape}: 0..{size - 1}); the file is corrupt "
                              "or was made for another base")


SUPERTUNING = Supertuning()
