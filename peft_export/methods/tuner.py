"""PeftMethod with the torch-side hooks every PEFT tuner shares, found from PEFT's class names.

Apart from base.py because these import PEFT (inside the functions), and the torch-free runtime may import
base.py only (import-linter counts imports inside functions too)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..errors import ConfigError
from .base import AdapterConfig, PeftMethod


class TunerMethod(PeftMethod):
    """A method whose PEFT classes are named by ``peft_classes``: (config class in ``peft``, the module of its
    layer class, the layer class). PEFT's layers keep each adapter in dicts named by ``adapter_layer_names``."""

    peft_classes: ClassVar[tuple[str, str, str]]
    saved_as_weight = False  # most tuners keep their parts as bare parameters: "<module>.<part>"
    summary_fields: ClassVar[tuple[str, ...]] = ("target_modules", "modules_to_save")  # the manifest's, by summary

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        """``peft_type`` (which LoRA's manifest alone predates) and ``summary_fields`` from the config."""
        return {"peft_type": self.peft_type, **{k: config.raw.get(k) for k in self.summary_fields}}

    def peft_config_class(self) -> type:
        """PEFT's config class of this method (to match target_modules by PEFT's own rule)."""
        import peft

        return getattr(peft, self.peft_classes[0])

    def peft_layers(self, model: Any, adapter_name: str) -> list[tuple[str, Any]]:
        """(name, module) of every PEFT layer of this method in ``model`` that holds ``adapter_name``."""
        import importlib

        layer_class = getattr(importlib.import_module(self.peft_classes[1]), self.peft_classes[2])
        return [(name, module) for name, module in model.named_modules()
                if isinstance(module, layer_class) and adapter_name in getattr(module, module.adapter_layer_names[0])]

    def rank_for(self, config: AdapterConfig, module: str, key: str = "r", default: int = 8,
                 pattern_key: str = "rank_pattern") -> int:
        """The rank (or ``key``'s size) PEFT gives ``module``: ``pattern_key``'s first matching entry (PEFT's rule),
        else ``key``."""
        from peft.utils.other import get_pattern_key  # only called where torch and PEFT are loaded (export/)

        pattern = config.raw.get(pattern_key) or {}
        matched = get_pattern_key(list(pattern), module)
        return int(pattern[matched]) if matched in pattern else int(config.raw.get(key, default))


def finite_factors(adapter_name: str, layer_name: str, method: str, **tensors: Any) -> dict[str, Any]:
    """``tensors`` (torch) as float32 numpy copies; ConfigError naming the layer if one holds NaN or Inf (after
    the scaling was folded in, which can overflow)."""
    import torch

    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().float()
        if not torch.isfinite(tensor).all():
            raise ConfigError(f"Adapter {adapter_name!r}: {method} weights of {layer_name!r} contain NaN or Inf "
                              f"({name}, scaling folded in)")
        out[name] = tensor.numpy().copy()
    return out
