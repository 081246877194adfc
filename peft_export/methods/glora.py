"""GLoRA (``peft_type: GLORA``): ``W + W A + B`` and ``b + b D + E + W C``, each of A..E a low-rank pair
(``Xd``, ``Xu``), a vector or a scalar (``X``) or absent (a saved ``zeros`` buffer) as ``config_A_B``, ``config_C``
and ``config_D_E`` say; C, D and E only on layers with a bias; merged by PEFT into the base weights and biases."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorInfo, TensorKey, check_number,
                   check_target_modules, is_unused_head)
from .tuner import TunerMethod

CHOICES = {"config_A_B": ("lora", "vector", "constant", "none"), "config_C": ("lora", "vector", "none"),
           "config_D_E": ("vector", "constant", "none")}
DEFAULTS = {"config_A_B": "lora", "config_C": "lora", "config_D_E": "constant"}


def forms(config: AdapterConfig, path: str, layer: BaseLayer) -> dict[str, tuple[int, ...]]:
    """The tensors PEFT saves for one path (``glora_A``..``glora_E``) of ``layer``, with their shapes."""
    raw, (out, inp), r = config.raw, layer.weight_shape, int(config.raw.get("r", 4))
    letter = path[-1]
    if letter in "AB":
        kind = raw.get("config_A_B", DEFAULTS["config_A_B"])
        return {"lora": {"Xd": (out, r), "Xu": (r, inp)}, "vector": {"X": (out, 1)}, "constant": {"X": (1,)},
                "none": {"zeros": (out, inp)}}[kind]
    if letter == "C":
        kind = raw.get("config_C", DEFAULTS["config_C"]) if layer.has_bias else "none"
        return {"lora": {"Xd": (inp, r), "Xu": (r, 1)}, "vector": {"X": (inp, 1)}, "none": {"zeros": (inp, 1)}}[kind]
    kind = raw.get("config_D_E", DEFAULTS["config_D_E"]) if layer.has_bias else "none"
    return {"vector": {"X": (out,)}, "constant": {"X": (1,)}, "none": {"zeros": (out,)}}[kind]


class Glora(TunerMethod):
    peft_type = "GLORA"
    name = "GLoRA"
    switchable = Capability(False, "it scales the base weight and moves the bias, which a switchable graph's "
                                   "additive branch cannot do")
    key_pattern = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>glora_[A-E]\.(?:Xd|Xu|X|zeros))$")
    required_parts = ()  # per path and per layer (bias or not): check_tensors
    peft_classes = ("GloraConfig", "peft.tuners.glora", "GloraLayer")
    summary_fields = ("r", "config_A_B", "config_C", "config_D_E", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 4, integer=True, minimum=1, maximum=MAX_RANK)
        for key, allowed in CHOICES.items():
            if raw.get(key, DEFAULTS[key]) not in allowed:
                raise ConfigError(f"{where}: {key!r} must be one of {', '.join(allowed)}, found {raw.get(key)!r}")
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        raw = config.raw
        return (f"r={raw.get('r')} A/B={raw.get('config_A_B')} C={raw.get('config_C')} D/E={raw.get('config_D_E')} "
                f"targets={config.target_modules}")

    def check_tensor_shape(self, config: AdapterConfig, where: Any, key: TensorKey, shape: tuple[int, ...],
                           layer: BaseLayer) -> None:
        path, name = key.part.split(".")
        if self.supports_layer(layer) and name not in (wanted := forms(config, path, layer)):
            saved = ", ".join(f"{path}.{n}" for n in wanted)
            bias = "with" if layer.has_bias else "without"
            raise ConfigError(f"{where}: tensor {key.key!r} is not what PEFT saves for {path} of {key.module!r} "
                              f"(expected {saved} for this config and a layer {bias} bias); the config "
                              "and the weights disagree (was the config edited?)")
        super().check_tensor_shape(config, where, key, shape, layer)

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        path, name = key.part.split(".")
        return forms(config, path, layer)[name]

    def check_tensors(self, config: AdapterConfig, where: Any, keys: list[str], read: Callable[[str], TensorInfo],
                      layers: dict[str, BaseLayer], base_name: str, targeted: Callable[[], Iterable[str]],
                      params: dict[str, tuple[int, ...]] | None = None) -> None:
        """Also: every targeted module has each of its five paths complete, in the form its config and its bias
        give it (a missing tensor would be left at PEFT's initial value)."""
        modules: list[str] = []

        def remember() -> list[str]:
            modules.extend(targeted())
            return modules

        super().check_tensors(config, where, keys, read, layers, base_name, remember, params)
        found: dict[str, set[str]] = {}
        prefix = "base_model.model."
        for key in keys:
            if (match := self.key_pattern.match(key)) is not None:
                found.setdefault(match.group("module"), set()).add(match.group("part"))
                prefix = key[: match.start("module")]
        for module in sorted(set(modules) | set(found)):
            layer = layers.get(module)
            if layer is None or is_unused_head(module) or not self.supports_layer(layer):
                continue
            for path in (f"glora_{letter}" for letter in "ABCDE"):
                for name in forms(config, path, layer):
                    if f"{path}.{name}" not in found.get(module, set()):
                        raise ConfigError(
                            f"{where}: tensor {prefix}{module}.{path}.{name} is missing: target_modules "
                            f"{config.target_modules!r} put a {self.name} on {module!r}, but the file has no "
                            f"complete {path} for it. The file is incomplete or belongs to another adapter; save "
                            "the adapter again.")


GLORA = Glora()
