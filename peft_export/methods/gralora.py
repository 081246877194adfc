"""GraLoRA (``peft_type: GRALORA``): the weight split into ``k x k`` blocks, each with its own rank-``r/k`` LoRA
(plus an optional plain LoRA of rank ``hybrid_r``); merged by PEFT into the base weights."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number, check_target_modules,
                   tensor_pattern)
from .tuner import TunerMethod

GENERAL = ("gralora_A_general", "gralora_B_general")  # the hybrid plain LoRA, saved as Linear weights


class Gralora(TunerMethod):
    peft_type = "GRALORA"
    name = "GraLoRA"
    switchable = Capability(False, "its block-wise factors are not yet laid out as a switchable graph's low-rank "
                                   "branch")
    key_pattern = tensor_pattern("gralora_A", "gralora_B", *GENERAL)
    required_parts = ("gralora_A", "gralora_B")
    peft_classes = ("GraloraConfig", "peft.tuners.gralora", "GraloraLayer")
    summary_fields = ("r", "alpha", "gralora_k", "hybrid_r", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 32, integer=True, minimum=1, maximum=MAX_RANK)
        check_number(raw, where, "hybrid_r", 0, integer=True, minimum=0, maximum=MAX_RANK)
        check_number(raw, where, "alpha", 64)
        check_number(raw, where, "gralora_k", 2, integer=True, minimum=1, maximum=MAX_RANK)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return (f"r={config.raw.get('r')} k={config.raw.get('gralora_k', 2)} hybrid_r={config.raw.get('hybrid_r', 0)} "
                f"targets={config.target_modules}")

    def required_parts_for(self, config: AdapterConfig) -> tuple[str, ...]:
        return self.required_parts + (GENERAL if config.raw.get("hybrid_r", 0) else ())

    def check_tensor_shape(self, config: AdapterConfig, where: Any, key: TensorKey, shape: tuple[int, ...],
                           layer: BaseLayer) -> None:
        k = int(config.raw.get("gralora_k", 2))
        if key.part in GENERAL and not config.raw.get("hybrid_r", 0):
            raise ConfigError(f"{where}: {key.key!r} is a part of the hybrid LoRA, but adapter_config.json sets no "
                              "hybrid_r; the config and the weights disagree (was the config edited?)")
        if layer.is_linear and (layer.in_features % k or layer.out_features % k):
            raise ConfigError(f"{where}: gralora_k={k} does not divide the base layer {key.module!r} (weight "
                              f"{layer.weight_shape}), so {key.key!r} cannot fit it; was this adapter trained on "
                              "another base, or the config edited?")
        super().check_tensor_shape(config, where, key, shape, layer)

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        k, r, hybrid = (int(config.raw.get(f, d)) for f, d in (("gralora_k", 2), ("r", 32), ("hybrid_r", 0)))
        return {"gralora_A": (k, layer.in_features // k, r), "gralora_B": (k, r, layer.out_features // k),
                GENERAL[0]: (hybrid, layer.in_features), GENERAL[1]: (layer.out_features, hybrid)}[key.part]


GRALORA = Gralora()
