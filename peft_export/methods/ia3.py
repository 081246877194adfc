"""IA3 (``peft_type: IA3``): a learned scale per channel, ``W x * l`` (per output) or ``W (x * l)`` (per input on
``feedforward_modules``); merged by PEFT into the base weights, or switchable as a scale vector on the graph's
slot: after the bias (``lora_scale_post``), or on the input of feed-forward layers (``lora_scale_in``)."""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError
from .base import AdapterConfig, BaseLayer, Capability, TensorKey, check_target_modules, tensor_pattern
from .branch import SCALE_IN, SCALE_POST, Branch
from .tuner import TunerMethod, finite_factors


def is_feedforward(config: AdapterConfig, module: str) -> bool:
    """PEFT's rule: a regex string full-matches the module name, a list entry equals it or its last components."""
    feedforward = config.raw.get("feedforward_modules") or []
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, module) is not None
    return any(module == f or module.endswith("." + f) for f in feedforward)


class Ia3(TunerMethod):
    peft_type = "IA3"
    name = "IA3"
    switchable = Capability(True)
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

    def branch_factors(self, module: Any, adapter_name: str, layer_name: str) -> Branch:
        """PEFT's forward: ``base(x * l)`` on feed-forward layers, ``base(x) * l`` (after the bias) elsewhere."""
        import torch

        with torch.no_grad():
            scale = finite_factors(adapter_name, layer_name, self.name, l=module.ia3_l[adapter_name].flatten())["l"]
        return Branch(scales={SCALE_IN if module.is_feedforward else SCALE_POST: scale})


IA3 = Ia3()
