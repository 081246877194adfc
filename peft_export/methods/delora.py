"""DeLoRA (``peft_type: DELORA``): ``W + lambda * ||W||_c / r * B diag(1 / ||b_i|| ||a_i||) A`` (a LoRA update
normalised per rank and scaled by the base weight's column norms, captured at init); merged by PEFT into the base
weights."""

from __future__ import annotations

from typing import Any

from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number, check_target_modules,
                   tensor_pattern)
from .tuner import TunerMethod


class Delora(TunerMethod):
    peft_type = "DELORA"
    name = "DeLoRA"
    switchable = Capability(False, "its per-rank normalisation is not yet folded into a switchable graph's "
                                   "low-rank factors")
    key_pattern = tensor_pattern("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
    required_parts = ("delora_A", "delora_B", "delora_lambda")  # delora_w_norm: PEFT recomputes it when absent
    peft_classes = ("DeloraConfig", "peft.tuners.delora", "DeloraLayer")
    summary_fields = ("r", "delora_lambda", "rank_pattern", "lambda_pattern", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 8, integer=True, minimum=1, maximum=MAX_RANK)
        check_number(raw, where, "delora_lambda", 15)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return f"r={config.raw.get('r')} lambda={config.raw.get('delora_lambda')} targets={config.target_modules}"

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        r = self.rank_for(config, key.module)
        return {"delora_A": (r, layer.in_features), "delora_B": (layer.out_features, r), "delora_lambda": (1,),
                "delora_w_norm": (layer.in_features,)}[key.part]


DELORA = Delora()
