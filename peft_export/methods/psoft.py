"""PSOFT (``peft_type: PSOFT``): an orthogonal (r, r) rotation ``R`` (from ``r (r - 1) / 2`` trained values where
``psoft_orth``, else a trained (r, r) matrix), scaled by trained vectors (``psoft_mag_a``/``psoft_mag_b``), inserted
between frozen SVD factors of the base weight's top ``r`` directions, which PEFT recomputes from the base weight at
load; merged by PEFT into the base weights."""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number,
                   check_target_modules)
from .tuner import TunerMethod

# the trained parts and the config flag that makes each one (None: always there)
PARTS = {"psoft_R.weight": None, "psoft_R.vector_a": "psoft_mag_a", "psoft_R.vector_b": "psoft_mag_b"}


class Psoft(TunerMethod):
    peft_type = "PSOFT"
    name = "PSOFT"
    switchable = Capability(False, "a rotation inside the base weight's own SVD factors, not a low-rank branch")
    key_pattern = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>psoft_R\.(?:weight|vector_[ab]))$")
    required_parts = tuple(PARTS)
    peft_classes = ("PsoftConfig", "peft.tuners.psoft", "PsoftLayer")
    summary_fields = ("r", "psoft_alpha", "ab_svd_init", "psoft_svd", "psoft_orth", "psoft_mag_a", "psoft_mag_b",
                      "use_cayley_neumann", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 32, integer=True, minimum=1, maximum=MAX_RANK)
        check_number(raw, where, "psoft_alpha", 32)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return (f"r={config.raw.get('r')} alpha={config.raw.get('psoft_alpha')} orth={config.raw.get('psoft_orth')} "
                f"targets={config.target_modules}")

    def required_parts_for(self, config: AdapterConfig) -> tuple[str, ...]:
        return tuple(part for part, flag in PARTS.items() if flag is None or config.raw.get(flag, True))

    def check_tensor_shape(self, config: AdapterConfig, where: Any, key: TensorKey, shape: tuple[int, ...],
                           layer: BaseLayer) -> None:
        flag = PARTS[key.part]
        if flag is not None and not config.raw.get(flag, True):
            raise ConfigError(f"{where}: tensor {key.key!r} is saved but adapter_config.json sets {flag} false, so "
                              "PEFT would not load it; the config and the weights disagree (was the config edited?)")
        r = int(config.raw.get("r", 32))
        if layer.is_linear and r > min(layer.weight_shape):
            raise ConfigError(f"{where}: r={r} exceeds the base layer {key.module!r} (weight {layer.weight_shape}): "
                              "PSOFT rotates at most min(out, in) directions; was this adapter trained on another "
                              "base, or the config edited?")
        super().check_tensor_shape(config, where, key, shape, layer)

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        r = int(config.raw.get("r", 32))
        if key.part != "psoft_R.weight":
            return (r,)
        return (r * (r - 1) // 2,) if config.raw.get("psoft_orth", True) else (r, r)


PSOFT = Psoft()
