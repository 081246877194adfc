"""BEFT (``peft_type: BEFT``): a trained bias added to each targeted layer's output; merged by PEFT into the base
layer's bias."""

from __future__ import annotations

from typing import Any

from .base import AdapterConfig, BaseLayer, Capability, TensorKey, check_target_modules, tensor_pattern
from .tuner import TunerMethod


class Beft(TunerMethod):
    peft_type = "BEFT"
    name = "BEFT"
    switchable = Capability(False, "a trained bias is not a low-rank branch of a switchable graph")
    key_pattern = tensor_pattern("beft_bias")
    required_parts = ("beft_bias",)
    peft_classes = ("BeftConfig", "peft.tuners.beft", "BeftLayer")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_target_modules(raw, where)

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        return (1, layer.out_features)


BEFT = Beft()
