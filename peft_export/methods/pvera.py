"""PVeRA (``peft_type: PVERA``): VeRA with a probabilistic middle scale (``lambda_d`` holds a mean and a spread, 2r
values) over one pair of frozen random projections shared by every layer; exported with the learned mean, which is
what PEFT merges and runs unless ``sample_at_inference`` is set (refused: the output would be random)."""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError
from .base import AdapterConfig, BaseLayer, Capability, RefusedOption, TensorKey, tensor_pattern
from .vera import Vera

SHARED = re.compile(r"^(?:base_model\.)?(?P<name>pvera_A|pvera_B)$")
SAMPLED = RefusedOption(
    "sample_at_inference",
    message="{where}: 'sample_at_inference' is set ({value!r}): this {method} adapter draws a random scale on every "
            "forward, so no export can reproduce it. Set it to false to export the learned mean.")


class Pvera(Vera):
    peft_type = "PVERA"
    saved_projections = ("pvera_A", "pvera_B")
    name = "PVeRA"
    switchable = Capability(False, "its per-layer scale vectors are not yet folded into a switchable graph's "
                                   "low-rank branch")
    key_pattern = tensor_pattern("pvera_lambda_b", "pvera_lambda_d")
    required_parts = ("pvera_lambda_b", "pvera_lambda_d")
    refused_options = Vera.refused_options + (SAMPLED,)
    peft_classes = ("PveraConfig", "peft.tuners.pvera", "PveraLayer")
    summary_fields = ("r", "target_modules", "save_projection", "projection_prng_key", "modules_to_save")

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        return (layer.out_features,) if key.part == "pvera_lambda_b" else (2 * int(config.raw.get("r", 256)),)

    def shared_tensor(self, key: str) -> str | None:
        match = SHARED.match(key)
        return match.group("name") if match else None

    def check_shared_tensor(self, config: AdapterConfig, where: Any, key: str, name: str,
                            shape: tuple[int, ...]) -> None:
        # pvera_A: (2r, the largest input of the targeted layers); pvera_B: (the largest output, r)
        r = int(config.raw.get("r", 256))
        rows = 2 * r if name == "pvera_A" else r
        if len(shape) != 2 or shape[0 if name == "pvera_A" else 1] != rows:
            wanted = f"({rows}, any)" if name == "pvera_A" else f"(any, {rows})"
            raise ConfigError(f"{where}: {key!r} has shape {tuple(shape)}, expected {wanted} for r={r} in "
                              "adapter_config.json; the config and the weights disagree (was the config edited?)")


PVERA = Pvera()
