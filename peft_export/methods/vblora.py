"""VBLoRA (``peft_type: VBLORA``): ``W + B A`` with every row of ``A`` and ``B`` built from the top-k of a vector
bank shared by all layers (saved once as ``base_model.vblora_vector_bank``) mixed by per-layer logits; merged by
PEFT into the base weights."""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, RefusedOption, TensorKey, check_number,
                   check_target_modules, tensor_pattern)
from .tuner import TunerMethod

SHARED = re.compile(r"^(?:base_model\.)?(?P<name>vblora_vector_bank)$")
TOPK_ONLY = RefusedOption(
    "save_only_topk_weights",
    message="{where}: 'save_only_topk_weights' is set ({value!r}): the file keeps only the top-k logits and their "
            "integer indices, which peft_export does not check yet. Save the {method} adapter with "
            "save_only_topk_weights=False to export it.")


class Vblora(TunerMethod):
    peft_type = "VBLORA"
    name = "VBLoRA"
    switchable = Capability(False, "its factors are mixed from a shared vector bank and not yet folded into a "
                                   "switchable graph's low-rank factors")
    key_pattern = tensor_pattern("vblora_logits_A", "vblora_logits_B")
    required_parts = ("vblora_logits_A", "vblora_logits_B")
    refused_options = TunerMethod.refused_options + (TOPK_ONLY,)
    peft_classes = ("VBLoRAConfig", "peft.tuners.vblora", "VBLoRALayer")
    summary_fields = ("r", "num_vectors", "vector_length", "topk", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 4, integer=True, minimum=1, maximum=MAX_RANK)
        check_number(raw, where, "num_vectors", 256, integer=True, minimum=1, maximum=1 << 20)
        check_number(raw, where, "vector_length", 256, integer=True, minimum=1, maximum=1 << 20)
        check_number(raw, where, "topk", 2, integer=True, minimum=1, maximum=raw.get("num_vectors", 256))
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return (f"r={config.raw.get('r')} vectors={config.raw.get('num_vectors')}x{config.raw.get('vector_length')} "
                f"topk={config.raw.get('topk', 2)} targets={config.target_modules}")

    def check_tensor_shape(self, config: AdapterConfig, where: Any, key: TensorKey, shape: tuple[int, ...],
                           layer: BaseLayer) -> None:
        length = int(config.raw.get("vector_length", 256))
        if layer.is_linear and (layer.in_features % length or layer.out_features % length):
            raise ConfigError(f"{where}: vector_length={length} does not divide the base layer {key.module!r} "
                              f"(weight {layer.weight_shape}), so {key.key!r} cannot fit it; was this adapter "
                              "trained on another base, or the config edited?")
        super().check_tensor_shape(config, where, key, shape, layer)

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        r, vectors, length = (int(config.raw.get(f, d)) for f, d in (("r", 4), ("num_vectors", 256),
                                                                      ("vector_length", 256)))
        if key.part == "vblora_logits_A":
            return (r, layer.in_features // length, vectors)
        return (layer.out_features // length, r, vectors)

    def shared_tensor(self, key: str) -> str | None:
        match = SHARED.match(key)
        return match.group("name") if match else None

    def check_shared_tensor(self, config: AdapterConfig, where: Any, key: str, name: str,
                            shape: tuple[int, ...]) -> None:
        wanted = (int(config.raw.get("num_vectors", 256)), int(config.raw.get("vector_length", 256)))
        if tuple(shape) != wanted:
            raise ConfigError(f"{where}: {key!r} has shape {tuple(shape)}, expected {wanted} (num_vectors, "
                              "vector_length in adapter_config.json); the config and the weights disagree (was the "
                              "config edited?)")

    def check_shared_complete(self, config: AdapterConfig, where: Any, found: set[str]) -> None:
        if "vblora_vector_bank" not in found:
            raise ConfigError(f"{where}: tensor base_model.vblora_vector_bank is missing: every {self.name} layer "
                              "mixes its factors from it. The file is incomplete; save the adapter again.")


VBLORA = Vblora()
