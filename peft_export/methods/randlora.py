"""RandLoRA (``peft_type: RANDLORA``): ``W + scaling * B diag(lambda) A diag(gamma)`` summed over full-rank sets
of frozen random bases ``A``, ``B`` shared by every layer (saved once as ``base_model.randlora_A``/``randlora_B``
and again under each module) with trained per-layer scales; merged by PEFT into the base weights."""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number, check_target_modules,
                   tensor_pattern)
from .tuner import TunerMethod

SHARED = re.compile(r"^(?:base_model\.)?(?P<name>randlora_A|randlora_B)$")


def _bases(config: AdapterConfig, layer: BaseLayer) -> tuple[int, int, int, int]:
    """(r, number of bases PEFT gives the layer: ceil(min(in, out) / r), min(in, out), max(in, out))."""
    r = int(config.raw.get("r", 32))
    small, large = min(layer.weight_shape), max(layer.weight_shape)
    return r, math.ceil(small / r), small, large


class RandLora(TunerMethod):
    peft_type = "RANDLORA"
    saved_projections = ("randlora_A", "randlora_B")
    saved_projections_are = "shared random bases"
    name = "RandLoRA"
    switchable = Capability(False, "its full-rank sum of scaled random bases is not a low-rank branch")
    key_pattern = tensor_pattern("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")
    required_parts = ("randlora_lambda", "randlora_gamma")  # the per-module bases are copies of the shared ones
    peft_classes = ("RandLoraConfig", "peft.tuners.randlora", "RandLoraLayer")
    summary_fields = ("r", "randlora_alpha", "save_projection", "projection_prng_key", "sparse", "very_sparse",
                      "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 32, integer=True, minimum=1, maximum=MAX_RANK)
        check_number(raw, where, "randlora_alpha", 640)
        check_number(raw, where, "projection_prng_key", 0, integer=True)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return f"r={config.raw.get('r')} alpha={config.raw.get('randlora_alpha')} targets={config.target_modules}"

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        r, bases, small, _ = _bases(config, layer)
        return (r, bases) if key.part == "randlora_lambda" else (bases, small)

    def check_tensor_shape(self, config: AdapterConfig, where: Any, key: TensorKey, shape: tuple[int, ...],
                           layer: BaseLayer) -> None:
        if key.part not in ("randlora_A", "randlora_B"):
            return super().check_tensor_shape(config, where, key, shape, layer)
        # A module's copy of a shared basis: at least as large as the slice PEFT takes for this layer.
        r, bases, small, large = _bases(config, layer)
        minimum = (r, 1, small) if key.part == "randlora_A" else (large, bases, r)
        exact = (0,) if key.part == "randlora_A" else (2,)  # the axes that must equal r
        fits = len(shape) == 3 and all(s >= m for s, m in zip(shape, minimum)) and all(
            shape[i] == minimum[i] for i in exact)
        if not fits:
            raise ConfigError(
                f"{where}: {key.key!r} has shape {tuple(shape)}, expected at least {minimum} (r={r} on axis "
                f"{exact[0]}) for the base layer {key.module!r} (weight {layer.weight_shape}) and adapter_config.json; "
                "was this adapter trained on another base, or the config edited?")

    def shared_tensor(self, key: str) -> str | None:
        match = SHARED.match(key)
        return match.group("name") if match else None

    def check_shared_tensor(self, config: AdapterConfig, where: Any, key: str, name: str,
                            shape: tuple[int, ...]) -> None:
        # randlora_A: (r, 1, the largest min(in, out)); randlora_B: (the largest max(in, out), bases, r)
        r = int(config.raw.get("r", 32))
        if len(shape) != 3 or shape[0 if name == "randlora_A" else 2] != r:
            wanted = f"({r}, 1, any)" if name == "randlora_A" else f"(any, any, {r})"
            raise ConfigError(f"{where}: {key!r} has shape {tuple(shape)}, expected {wanted} for r={r} in "
                              "adapter_config.json; the config and the weights disagree (was the config edited?)")


RANDLORA = RandLora()
