"""DeFT (``peft_type: DEFT``): a rank-``r`` update ``P R`` of the base weight, decomposed (ReLU or QR) before it is
applied; merged by PEFT into the base weights."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number, check_target_modules,
                   tensor_pattern)
from .tuner import TunerMethod


class Deft(TunerMethod):
    peft_type = "DEFT"
    name = "DeFT"
    switchable = Capability(False, "its decomposed update is not yet folded into a switchable graph's low-rank "
                                   "factors")
    key_pattern = tensor_pattern("deft_P", "deft_R")
    required_parts = ("deft_P", "deft_R")
    peft_classes = ("DeftConfig", "peft.tuners.deft", "DeftLayer")
    summary_fields = ("r", "alpha", "decomposition_method", "para", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 8, integer=True, minimum=1, maximum=MAX_RANK)
        if raw.get("alpha") is not None:
            check_number(raw, where, "alpha", None)
        if raw.get("decomposition_method", "relu") not in ("relu", "qr"):
            raise ConfigError(f"{where}: 'decomposition_method' must be 'relu' or 'qr', found "
                              f"{raw['decomposition_method']!r}")
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return (f"r={config.raw.get('r')} decomposition={config.raw.get('decomposition_method', 'relu')} "
                f"targets={config.target_modules}")

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        r = int(config.raw.get("r", 8))
        return (layer.out_features, r) if key.part == "deft_P" else (r, layer.in_features)


DEFT = Deft()
