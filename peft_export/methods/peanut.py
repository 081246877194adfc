"""PEANuT (``peft_type: PEANUT``): ``W + scaling * f(W)^T`` where ``f`` runs the base weight itself through a small
network, ``A`` (r, out), ``depth`` encoder and decoder layers (r, r, with residuals) and ``B`` (out, r), with the
activation ``act_fn`` between them; merged by PEFT into the base weights."""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number,
                   check_target_modules)
from .tuner import TunerMethod

MAX_DEPTH = 64  # a sanity bound: each level adds two (r, r) layers per module


class Peanut(TunerMethod):
    peft_type = "PEANUT"
    name = "PEANuT"
    switchable = Capability(False, "its update is a non-linear function of the base weight, not a low-rank branch")
    key_pattern = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\."
                             r"(?P<part>peanut_A|peanut_B|peanut_(?:encoders|decoders)\.\d+)\.weight$")
    required_parts = ("peanut_A", "peanut_B")
    saved_as_weight = True  # every part is an nn.Linear: "<module>.<part>.weight"
    peft_classes = ("PeanutConfig", "peft.tuners.peanut", "PeanutLayer")
    summary_fields = ("r", "depth", "act_fn", "scaling", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 32, integer=True, minimum=1, maximum=MAX_RANK)
        check_number(raw, where, "depth", 0, integer=True, minimum=0, maximum=MAX_DEPTH)
        check_number(raw, where, "scaling", 1.0)
        act_fn = raw.get("act_fn", "relu")
        if not isinstance(act_fn, str) or not act_fn:
            raise ConfigError(f"{where}: 'act_fn' must be the name of an activation (transformers' ACT2FN, e.g. "
                              f"'relu'), found {act_fn!r}")
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        raw = config.raw
        return (f"r={raw.get('r')} depth={raw.get('depth', 0)} act_fn={raw.get('act_fn', 'relu')} "
                f"targets={config.target_modules}")

    def required_parts_for(self, config: AdapterConfig) -> tuple[str, ...]:
        depth = int(config.raw.get("depth", 0))
        return self.required_parts + tuple(f"peanut_{side}.{i}" for side in ("encoders", "decoders")
                                           for i in range(depth))

    def check_tensor_shape(self, config: AdapterConfig, where: Any, key: TensorKey, shape: tuple[int, ...],
                           layer: BaseLayer) -> None:
        depth = int(config.raw.get("depth", 0))
        if "." in key.part and int(key.part.rsplit(".", 1)[1]) >= depth:
            raise ConfigError(f"{where}: tensor {key.key!r} is a hidden layer beyond 'depth' ({depth}) in "
                              "adapter_config.json, which PEFT would not load; the config and the weights "
                              "disagree (was the config edited?)")
        super().check_tensor_shape(config, where, key, shape, layer)

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        r = int(config.raw.get("r", 32))
        if key.part == "peanut_A":
            return (r, layer.out_features)
        if key.part == "peanut_B":
            return (layer.out_features, r)
        return (r, r)


PEANUT = Peanut()
