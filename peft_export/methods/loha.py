"""LoHa (``peft_type: LOHA``): ``W + scaling * (w1_a w1_b) * (w2_a w2_b)`` (Hadamard product of two low-rank
products); merged by PEFT into the base weights."""

from __future__ import annotations

from typing import Any

from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number,
                   check_target_modules, tensor_pattern)
from .tuner import TunerMethod


def check_rank_and_alpha(raw: dict[str, Any], where: str) -> None:
    """The fields LyCORIS-style methods (LoHa, LoKr) share: ``r`` and ``alpha``."""
    check_number(raw, where, "r", 8, integer=True, minimum=1, maximum=MAX_RANK)
    check_number(raw, where, "alpha", 8)
    check_target_modules(raw, where)


class Loha(TunerMethod):
    peft_type = "LOHA"
    name = "LoHa"
    switchable = Capability(False, "the Hadamard product of two low-rank products is not itself low-rank, so a "
                                   "switchable graph's low-rank branch cannot run it")
    key_pattern = tensor_pattern("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")  # hada_t*: conv only
    required_parts = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    peft_classes = ("LoHaConfig", "peft.tuners.loha", "LoHaLayer")
    summary_fields = ("r", "alpha", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_rank_and_alpha(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return f"r={config.raw.get('r')} alpha={config.raw.get('alpha')} targets={config.target_modules}"

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        r = self.rank_for(config, key.module)
        return (layer.out_features, r) if key.part.endswith("_a") else (r, layer.in_features)


LOHA = Loha()
