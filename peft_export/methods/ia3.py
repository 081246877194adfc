"""IA3 (``peft_type: IA3``): a learned scale per channel, ``W x * l`` (per output) or ``W (x * l)`` (per input on
``feedforward_modules``); merged by PEFT into the base weights."""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError
from .base import AdapterConfig, BaseLayer, Capability, TensorKey, check_target_modules, tensor_pattern
from .tuner import TunerMethod


def is_feedforward(config: AdapterConfig, module: str) -> bool:
    """PEFT's rule: a regex string full-matches the module name, a list entry equals it or its last components."""
    feedforward = config.raw.get("feedforward_modules") or []
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, module) is not None
    return any(module == f or module.endswith("." + f) for f in feedforward)


class Ia3(TunerMethod):
    peft_type = "IA3"
    name = "IA3"
    switchable = Capability(False, "its per-channel scale multiplies the base layer's output, and a switchable graph "
                                   "has only additive low-rank branches so far")
    key_pattern = tensor_pattern("ia3_l")
    required_parts = ("ia3_l",)
    peft_classes = ("IA3Config", "peft.tuners.ia3", "IA3Layer")
    summary_fields = ("target_modules", "feedforward_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_target_modules(raw, where)
        feedforward = raw.get("feedforward_modules")
        if feedforward is not None and not isinstance(feedforward, (str, list)):
            raise ConfigError(f"{where}: 'feedforward_modules' must be a list of module names or a regex string, "
                              f"found {feedforward!r}")

    def describe(self, config: AdapterConfig) -> str:
        return f"feedforward={config.raw.get('feedforward_modules')} targets={config.target_modules}"

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        return (1, layer.in_features) if is_feedforward(config, key.module) else (layer.out_features, 1)


IA3 = Ia3()
