"""AdaLoRA (``peft_type: ADALORA``): ``W + scaling * B (A * E) / ranknum``, an SVD-shaped LoRA whose ranks were
pruned in training (pruned singular values are zero in ``lora_E``); merged by PEFT into the base weights, or
switchable as the low-rank branch ``A * E``, ``B * scaling / (ranknum + 1e-5)`` (PEFT's forward, exactly)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number,
                   check_target_modules, tensor_pattern)
from .branch import Branch
from .tuner import TunerMethod, finite_factors


class AdaLora(TunerMethod):
    peft_type = "ADALORA"
    name = "AdaLoRA"
    switchable = Capability(True)
    key_pattern = tensor_pattern("lora_A", "lora_B", "lora_E")
    required_parts = ("lora_A", "lora_B", "lora_E")
    peft_classes = ("AdaLoraConfig", "peft.tuners.adalora", "AdaLoraLayer")
    summary_fields = ("init_r", "target_r", "lora_alpha", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "init_r", 12, integer=True, minimum=1, maximum=MAX_RANK)
        check_number(raw, where, "lora_alpha", 8)
        check_number(raw, where, "total_step", None, integer=True, minimum=1)
        pattern = raw.get("rank_pattern")
        if pattern is not None and not (isinstance(pattern, dict) and all(
                isinstance(v, list) and all(isinstance(b, bool) for b in v) for v in pattern.values())):
            raise ConfigError(f"{where}: 'rank_pattern' must map module names to lists of booleans (AdaLoRA's kept "
                              f"ranks), found {pattern!r}")
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return (f"init_r={config.raw.get('init_r')} target_r={config.raw.get('target_r')} "
                f"alpha={config.raw.get('lora_alpha')} targets={config.target_modules}")

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        # With a rank_pattern PEFT resizes each module to its kept ranks (any r up to init_r), else r is init_r.
        r = None if config.raw.get("rank_pattern") else int(config.raw.get("init_r", 12))
        return {"lora_A": (r, layer.in_features), "lora_B": (layer.out_features, r), "lora_E": (r, 1)}[key.part]

    def branch_factors(self, module: Any, adapter_name: str, layer_name: str) -> Branch:
        import torch

        with torch.no_grad():
            lora_a = module.lora_A[adapter_name].float() * module.lora_E[adapter_name].float()  # (r, in)
            scale = float(module.scaling[adapter_name]) / (float(module.ranknum[adapter_name]) + 1e-5)  # as PEFT
            factors = finite_factors(adapter_name, layer_name, self.name, A=lora_a,
                                     B=module.lora_B[adapter_name].float() * scale)
        return Branch(factors["A"], factors["B"])


ADALORA = AdaLora()
