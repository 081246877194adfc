"""TinyLoRA (``peft_type: TINYLORA``): ``W + B R A`` with ``A`` (r, in) and ``B`` (out, r) frozen factors of the base
weight's SVD saved with the adapter, and ``R = sum_i v_i P_i`` a tiny trained vector ``v`` (u values, shared by a
group of modules as ``weight_tying`` says, saved once per group as ``base_model.tinylora_v.<group>``) mixing fixed
random (r, r) projections ``P`` (saved per module, or regenerated from ``projection_seed`` where
``save_projection`` is False); merged by PEFT into the base weights."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorInfo, TensorKey, check_number,
                   check_target_modules, tensor_pattern)
from .tuner import TunerMethod

SHARED = re.compile(r"^(?:base_model\.)?(?P<name>tinylora_v\.\d+)$")


def group_count(modules: int, weight_tying: float) -> int:
    """How many vectors ``v`` PEFT makes for ``modules`` targeted modules (its own rounding)."""
    return max(1, round(modules * (1.0 - weight_tying)))


class Tinylora(TunerMethod):
    peft_type = "TINYLORA"
    name = "TinyLoRA"
    switchable = Capability(False, "its update mixes per-group shared vectors through random projections, not yet "
                                   "folded into a switchable graph's low-rank factors")
    key_pattern = tensor_pattern("tinylora_A", "tinylora_B", "tinylora_P")
    required_parts = ("tinylora_A", "tinylora_B", "tinylora_P")
    peft_classes = ("TinyLoraConfig", "peft.tuners.tinylora", "TinyLoraLayer")
    summary_fields = ("r", "u", "weight_tying", "projection_seed", "save_projection", "target_modules",
                      "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 2, integer=True, minimum=1, maximum=MAX_RANK)
        check_number(raw, where, "u", 64, integer=True, minimum=1, maximum=1 << 20)
        check_number(raw, where, "weight_tying", 0.0, minimum=0, maximum=1)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        raw = config.raw
        return (f"r={raw.get('r')} u={raw.get('u')} weight_tying={raw.get('weight_tying', 0.0)} "
                f"targets={config.target_modules}")

    def required_parts_for(self, config: AdapterConfig) -> tuple[str, ...]:
        # save_projection=False: PEFT regenerates each module's P from projection_seed at load
        return self.required_parts if config.raw.get("save_projection", True) else ("tinylora_A", "tinylora_B")

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        r = int(config.raw.get("r", 2))
        if key.part == "tinylora_A":
            return (r, layer.in_features)
        if key.part == "tinylora_B":
            return (layer.out_features, r)
        return (int(config.raw.get("u", 64)), r, r)

    def shared_tensor(self, key: str) -> str | None:
        match = SHARED.match(key)
        return match.group("name") if match else None

    def check_shared_tensor(self, config: AdapterConfig, where: Any, key: str, name: str,
                            shape: tuple[int, ...]) -> None:
        wanted = (int(config.raw.get("u", 64)),)
        if tuple(shape) != wanted:
            raise ConfigError(f"{where}: {key!r} has shape {tuple(shape)}, expected {wanted} ('u' in "
                              "adapter_config.json); the config and the weights disagree (was the config edited?)")

    def check_tensors(self, config: AdapterConfig, where: Any, keys: list[str], read: Callable[[str], TensorInfo],
                      layers: dict[str, BaseLayer], base_name: str, targeted: Callable[[], Iterable[str]],
                      params: dict[str, tuple[int, ...]] | None = None) -> None:
        """Also: the file holds exactly one vector ``v`` per group PEFT makes for the targeted modules (a missing
        one would be left at its initial value, an extra one ignored)."""
        groups = {name for key in keys if (name := self.shared_tensor(key)) is not None}

        def targeted_with_groups() -> list[str]:
            modules = list(targeted())
            count = group_count(len(modules), float(config.raw.get("weight_tying", 0.0)))
            wanted = {f"tinylora_v.{i}" for i in range(count)}
            if groups != wanted:
                missing, extra = sorted(wanted - groups), sorted(groups - wanted)
                found = (f"tensor(s) base_model.{', base_model.'.join(missing)} missing" if missing
                         else f"unexpected tensor(s) base_model.{', base_model.'.join(extra)}")
                raise ConfigError(
                    f"{where}: {found}: {len(modules)} targeted modules with weight_tying="
                    f"{config.raw.get('weight_tying', 0.0)} make {count} shared vector(s) tinylora_v.0..{count - 1}. "
                    "The file is incomplete or the config was edited; save the adapter again.")
            return modules

        super().check_tensors(config, where, keys, read, layers, base_name, targeted_with_groups, params)


TINYLORA = Tinylora()
