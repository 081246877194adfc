"""Check an ``adapter_config.json`` before PEFT (or anything else) is imported for it.

PEFT will happily import modules named in some config fields (``auto_mapping``, ``megatron_core``) and load
any ``target_modules``; these checks refuse such configs first, naming the offending key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UnsafeModelError
from .st_config import read_json

MAX_RANK = 4096
SUPPORTED_PEFT_TYPES = ("LORA",)
# Fields whose non-empty value changes the architecture or the forward in ways a merged or switchable
# graph cannot reproduce exactly.
_UNSUPPORTED_WHEN_SET = (
    "use_dora",  # its lora_magnitude_vector tensors are not merged or checked here; refuse by name
    "layer_replication",
    "alora_invocation_tokens",
    "arrow_config",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "use_bdlora",
)
_DEFAULT_MEGATRON_CORE = "megatron.core"


@dataclass
class AdapterConfig:
    """The subset of a LoRA adapter_config.json that export decisions depend on."""

    raw: dict[str, Any]

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
    def base_model_name_or_path(self) -> str | None:
        return self.raw.get("base_model_name_or_path")

    @property
    def target_modules(self) -> list[str] | str:
        return self.raw.get("target_modules") or []

    @property
    def scaling(self) -> float:
        """PEFT's default scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def summary(self) -> dict[str, Any]:
        keys = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "bias", "modules_to_save")
        out = {k: self.raw.get(k) for k in keys}
        if isinstance(out["target_modules"], list):
            out["target_modules"] = sorted(out["target_modules"])
        return out


def _is_transformers_auto_mapping(value: Any) -> bool:
    """PEFT writes ``{"base_model_class": "BertModel", "parent_library": "transformers.models.bert.modeling_bert"}``
    into every adapter made with ``get_peft_model`` on a bare model. Only that harmless form is accepted (and it is
    never used here: adapters load through PeftModel.from_pretrained, not AutoPeftModel)."""
    if not isinstance(value, dict) or set(value) - {"base_model_class", "parent_library"}:
        return False
    library, cls = value.get("parent_library"), value.get("base_model_class")
    return (
        isinstance(library, str) and (library == "transformers" or library.startswith("transformers."))
        and all(part.isidentifier() for part in library.split("."))
        and isinstance(cls, str) and cls.isidentifier()
    )


def check_adapter_config(raw: dict[str, Any], where: str = "adapter_config.json") -> AdapterConfig:
    """Validate a parsed adapter_config.json; raise ConfigError/UnsafeModelError naming the bad key."""
    peft_type = raw.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise ConfigError(
            f"{where}: peft_type is {peft_type!r}; peft_export supports {', '.join(SUPPORTED_PEFT_TYPES)} adapters only"
        )
    if raw.get("auto_mapping") and not _is_transformers_auto_mapping(raw["auto_mapping"]):
        raise UnsafeModelError(
            f"{where}: 'auto_mapping' is {raw['auto_mapping']!r}; it makes PEFT import a class from outside "
            "transformers, refused"
        )
    if raw.get("megatron_config") or raw.get("megatron_core", _DEFAULT_MEGATRON_CORE) != _DEFAULT_MEGATRON_CORE:
        raise UnsafeModelError(f"{where}: 'megatron_config'/'megatron_core' would import Megatron code, refused")
    if raw.get("trust_remote_code"):
        raise UnsafeModelError(f"{where}: 'trust_remote_code' is set inside the adapter config, refused")

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
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{where}: {key}[{name!r}] must be a positive finite number, found {value!r}")
            if key == "rank_pattern" and (int(value) != value or value > MAX_RANK):
                raise ConfigError(f"{where}: {key}[{name!r}] must be an integer rank <= {MAX_RANK}, found {value!r}")

    targets = raw.get("target_modules")
    if not targets or not isinstance(targets, (str, list)) or (
        isinstance(targets, list) and not all(isinstance(t, str) and t for t in targets)
    ):
        raise ConfigError(f"{where}: 'target_modules' must be a non-empty list of module names or a regex string")
    if raw.get("modules_to_save"):
        raise ConfigError(
            f"{where}: 'modules_to_save' is set ({raw['modules_to_save']!r}): it stores full trained copies of "
            "modules, which peft_export does not export (LoRA weights only). Merge the adapter into its base with "
            "PEFT (merge_and_unload), save that, and export the merged model instead."
        )
    for key in _UNSUPPORTED_WHEN_SET:
        if raw.get(key):
            raise ConfigError(f"{where}: {key!r} is set ({raw[key]!r}); peft_export cannot export it exactly")
    return AdapterConfig(raw)


def read_adapter_config(folder: Path) -> AdapterConfig:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no adapter_config.json; is it a PEFT adapter folder?")
    return check_adapter_config(read_json(path), where=str(path))


def adapter_weights_path(folder: Path) -> Path:
    """The adapter's safetensors file; pickle-based .bin weights are refused."""
    path = folder / "adapter_model.safetensors"
    if path.is_file():
        return path
    if (folder / "adapter_model.bin").is_file():
        raise UnsafeModelError(
            f"{folder} has only adapter_model.bin (a pickle, which can run code when loaded). peft_export loads "
            "safetensors only: re-save the adapter with save_pretrained(..., safe_serialization=True)."
        )
    raise ConfigError(f"{folder} has no adapter_model.safetensors")
