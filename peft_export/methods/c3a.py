"""C3A (``peft_type: C3A``): a block-circulant update, one kernel vector per (out, in) block, expanded to a dense
delta by PEFT's merge into the base weights."""

from __future__ import annotations

from typing import Any

from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number, check_target_modules,
                   tensor_pattern)
from .tuner import TunerMethod


class C3a(TunerMethod):
    peft_type = "C3A"
    name = "C3A"
    switchable = Capability(False, "a block-circulant update is not low-rank")
    key_pattern = tensor_pattern("c3a_kernel")
    required_parts = ("c3a_kernel",)
    peft_classes = ("C3AConfig", "peft.tuners.c3a", "C3ALayer")
    summary_fields = ("block_size", "block_size_pattern", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "block_size", 256, integer=True, minimum=1, maximum=MAX_RANK)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return f"block_size={config.raw.get('block_size')} targets={config.target_modules}"

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        from peft.utils.other import get_pattern_key  # only called where PEFT is loaded (export/)

        pattern = config.raw.get("block_size_pattern") or {}
        matched = get_pattern_key(list(pattern), key.module)
        size = int(pattern.get(matched, config.raw.get("block_size", 256)))
        return (layer.out_features // size, layer.in_features // size, size)


C3A = C3a()
