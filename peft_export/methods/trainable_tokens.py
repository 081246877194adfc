"""Trainable tokens (``peft_type: TRAINABLE_TOKENS``): new values for a few rows of an embedding matrix (the tokens
``token_indices`` names); merged by PEFT into the base embedding."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import AdapterConfig, BaseLayer, Capability, TensorKey, check_target_modules, tensor_pattern
from .tuner import TunerMethod


class TrainableTokens(TunerMethod):
    peft_type = "TRAINABLE_TOKENS"
    name = "trainable tokens"
    switchable = Capability(False, "it replaces rows of the embedding matrix, which a switchable graph shares")
    key_pattern = tensor_pattern("trainable_tokens_delta")
    required_parts = ("trainable_tokens_delta",)
    layer_kinds = "embedding layers"
    peft_classes = ("TrainableTokensConfig", "peft.tuners.trainable_tokens", "TrainableTokensLayer")
    summary_fields = ("token_indices", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        indices = raw.get("token_indices")
        if not (isinstance(indices, list) and indices and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)):
            raise ConfigError(f"{where}: 'token_indices' must be a non-empty list of token ids (integers >= 0), "
                              f"found {indices!r}")
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return f"tokens={len(config.raw['token_indices'])} targets={config.target_modules}"

    def supports_layer(self, layer: BaseLayer) -> bool:
        return not layer.is_linear and layer.weight_shape is not None and len(layer.weight_shape) == 2

    def check_tensor_shape(self, config: AdapterConfig, where: Any, key: TensorKey, shape: tuple[int, ...],
                           layer: BaseLayer) -> None:
        indices = config.raw["token_indices"]
        if self.supports_layer(layer) and max(indices) >= layer.weight_shape[0]:
            raise ConfigError(f"{where}: adapter_config.json's 'token_indices' names token {max(indices)}, outside "
                              f"the base embedding {key.module!r} ({layer.weight_shape[0]} tokens); was this adapter "
                              "trained on another base or vocabulary?")
        super().check_tensor_shape(config, where, key, shape, layer)

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        return (len(config.raw["token_indices"]), layer.weight_shape[1])


TRAINABLE_TOKENS = TrainableTokens()
