"""LoRA (``peft_type: LORA``): ``W x + scaling * B A x``, merged or as a switchable low-rank branch.

Plain LoRA and rsLoRA (scaling alpha / sqrt(r)), with per-module ranks and alphas (``rank_pattern``,
``alpha_pattern``), and DoRA (``use_dora``: a magnitude vector per output; switchable as the scale
``m / ||W + scaling B A||`` per output on the base product and the branch, computed from the base weights at
export). What changes the forward beyond that (other LoRA variants, trained biases) is refused by name in
switchable exports (or everywhere, where even a merge cannot reproduce it).
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, RefusedOption,
                   TensorKey, check_target_modules)
from .branch import SCALE_OUT, Branch
from .tuner import TunerMethod, finite_factors


class LoraAdapterConfig(AdapterConfig):
    """The subset of a LoRA adapter_config.json that export decisions depend on."""

    @property
    def r(self) -> int:
        return int(self.raw["r"])

    @property
    def lora_alpha(self) -> float:
        return float(self.raw.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.raw.get("use_rslora", False))

    @property
    def use_dora(self) -> bool:
        return bool(self.raw.get("use_dora", False))

    @property
    def scaling(self) -> float:
        """PEFT's default scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class Lora(TunerMethod):
    peft_type = "LORA"
    name = "LoRA"
    merged = Capability(True)
    switchable = Capability(True)
    config_class = LoraAdapterConfig
    # PEFT saves LoRA tensors as "<prefix>.<module path>.lora_A.weight" (no adapter name in the key).
    key_pattern = re.compile(
        r"^(?:base_model\.model\.)?(?P<module>.+)\."
        r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.weight)?$"
    )
    required_parts = ("lora_A", "lora_B")
    peft_classes = ("LoraConfig", "peft.tuners.lora", "LoraLayer")
    saved_as_weight = True
    extras_refused = "only LoRA tensors (and modules_to_save copies the config names) are exported"
    magnitude = "lora_magnitude_vector"  # DoRA's part: one value per output of the base layer
    refused_options = (
        # Everywhere: fields whose non-empty value changes the architecture or the forward in ways a merged or
        # switchable graph cannot reproduce exactly.
        RefusedOption("layer_replication"),
        RefusedOption("alora_invocation_tokens"),
        RefusedOption("arrow_config"),
        RefusedOption("target_parameters"),
        RefusedOption("trainable_token_indices"),
        RefusedOption("use_qalora"),
        RefusedOption("use_bdlora"),
        # Switchable only: the forward is more than ``W x + scaling * B A x``; merging handles it.
        RefusedOption("lora_bias", "it trains a bias on lora_B", switchable_only=True),
        RefusedOption("kasa_config", "KaSA changes the LoRA forward", switchable_only=True),
        RefusedOption("monteclora_config", "MonteCLoRA changes the LoRA forward", switchable_only=True),
        RefusedOption("velora_config", "VeLoRA changes the LoRA forward", switchable_only=True),
    )

    # ---- adapter_config.json

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        r = raw.get("r")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0 or r > MAX_RANK:
            raise ConfigError(f"{where}: 'r' must be an integer in 1..{MAX_RANK}, found {r!r}")
        alpha = raw.get("lora_alpha", 8)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ConfigError(f"{where}: 'lora_alpha' must be a finite number, found {alpha!r}")
        for key in ("alpha_pattern", "rank_pattern"):
            pattern = raw.get(key) or {}
            if not isinstance(pattern, dict):
                raise ConfigError(f"{where}: {key!r} must be a mapping, found {type(pattern).__name__}")
            for name, value in pattern.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value <= 0:
                    raise ConfigError(f"{where}: {key}[{name!r}] must be a positive finite number, found {value!r}")
                if key == "rank_pattern" and (int(value) != value or value > MAX_RANK):
                    raise ConfigError(
                        f"{where}: {key}[{name!r}] must be an integer rank <= {MAX_RANK}, found {value!r}")
        check_target_modules(raw, where)

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        keys = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "bias", "modules_to_save")
        out = {k: config.raw.get(k) for k in keys}
        if isinstance(out["target_modules"], list):
            out["target_modules"] = sorted(out["target_modules"])
        return out

    def describe(self, config: LoraAdapterConfig) -> str:
        return f"r={config.r} alpha={config.lora_alpha} targets={config.target_modules}"

    def nonfinite_hint(self, config: LoraAdapterConfig, config_path: Any) -> str:
        return (f": its scaling lora_alpha / r = {config.lora_alpha:g} / {config.r} = {config.scaling:.3g} (or its "
                f"weights) overflow float32. Check lora_alpha and r in {config_path}")

    # ---- adapter tensors

    def required_parts_for(self, config: LoraAdapterConfig) -> tuple[str, ...]:
        return self.required_parts + ((self.magnitude,) if config.use_dora else ())

    def tensor_name(self, prefix: str, module: str, part: str) -> str:
        return f"{prefix}{module}.{part}" if part == self.magnitude else super().tensor_name(prefix, module, part)

    def check_tensor_shape(self, config: LoraAdapterConfig, where: Any, key: TensorKey, shape: tuple[int, ...],
                           layer: BaseLayer) -> None:
        name, part = key.key, key.part
        if part == self.magnitude and layer.is_linear:
            if not config.use_dora:
                raise ConfigError(f"{where}: {name!r} is a DoRA magnitude, but adapter_config.json does not set "
                                  "use_dora; the config and the weights disagree (was the config edited?)")
            if tuple(shape) != (layer.out_features,):
                raise ConfigError(
                    f"{where}: {name!r} has shape {tuple(shape)} but the base layer has {layer.out_features} "
                    f"outputs, expected ({layer.out_features},); was this adapter trained on another base?")
            return
        if not layer.is_linear or part not in self.required_parts:
            raise ConfigError(f"{where}: {name!r} targets a {layer.type_name}; only Linear layers are supported")
        rank = config.raw.get("rank_pattern") or {}
        if len(shape) != 2:
            raise ConfigError(f"{where}: {name!r} has shape {tuple(shape)}, expected a matrix")
        if part == "lora_A" and shape[1] != layer.in_features:
            raise ConfigError(
                f"{where}: {name!r} has shape {tuple(shape)} but the base layer takes {layer.in_features} "
                "inputs; was this adapter trained on another base?"
            )
        if part == "lora_B" and shape[0] != layer.out_features:
            raise ConfigError(
                f"{where}: {name!r} has shape {tuple(shape)} but the base layer has {layer.out_features} "
                "outputs; was this adapter trained on another base?"
            )
        from peft.utils.other import get_pattern_key  # only called where torch and PEFT are loaded (export/)

        pattern = get_pattern_key(list(rank), key.module)  # PEFT's rule: the first rank_pattern key matching
        expected = rank.get(pattern, config.r)
        if (shape[0] if part == "lora_A" else shape[1]) != expected:
            source = f"rank_pattern[{pattern!r}]={expected}" if pattern in rank else f"r={expected}"
            raise ConfigError(
                f"{where}: {name!r} has shape {tuple(shape)}, but adapter_config.json gives {key.module!r} rank "
                f"{source}; the config and the weights disagree (was the config edited?)")

    # ---- torch side

    def branch_needs_base_weights(self, config: LoraAdapterConfig) -> bool:
        return config.use_dora  # DoRA's scale divides by the norm of W + scaling B A

    def branch_factors(self, module: Any, adapter_name: str, layer_name: str) -> Branch:
        """PEFT's own ``lora_A``, ``lora_B`` and ``scaling`` of the layer, so per-module ranks and alphas and
        rsLoRA's scaling are exactly what PEFT's forward uses. DoRA adds the scale ``g = m / ||W + scaling B A||``
        per output (PEFT's forward: ``g * (W x) + g * scaling B A x`` plus the bias), computed as PEFT computes
        it, from the base weight: the graph multiplies the base product and the branch by it before the bias."""
        import torch

        variant = getattr(module, "lora_variant", {}).get(adapter_name)
        dora = variant is not None and type(variant).__name__ == "DoraLinearVariant"
        if (variant is not None and not dora) or getattr(module, "lora_bias", {}).get(adapter_name):
            what = type(variant).__name__ if variant is not None else "lora_bias"
            raise ConfigError(f"Adapter {adapter_name!r} uses {what} on {layer_name!r}; a switchable export cannot "
                              "reproduce it exactly. Export it merged instead.")
        with torch.no_grad():
            lora_a = module.lora_A[adapter_name].weight.float()  # (r, in)
            lora_b = module.lora_B[adapter_name].weight.float()  # (out, r)
            scaling = float(module.scaling[adapter_name])
            tensors = {"A": lora_a, "B": lora_b * scaling}
            if dora:
                layer = module.lora_magnitude_vector[adapter_name]
                weight = module.get_base_layer().weight.float()  # (out, in)
                norm = layer.get_weight_norm(weight, lora_b @ lora_a, scaling)  # PEFT's own norm, as its forward
                tensors["magnitude / norm"] = layer.weight.float() / norm  # (out,)
        factors = finite_factors(adapter_name, layer_name, self.name, **tensors)
        scales = {SCALE_OUT: factors["magnitude / norm"]} if dora else {}
        return Branch(factors["A"], factors["B"], scales)

LORA = Lora()
