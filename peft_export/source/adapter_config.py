"""Check an ``adapter_config.json`` before PEFT (or anything else) is imported for it.

PEFT will happily import modules named in some config fields (``auto_mapping``, ``megatron_core``) and load
any ``target_modules``; these checks refuse such configs first, naming the offending key. What is particular to a
PEFT method (LoRA's ``r`` and ``lora_alpha``, the options it cannot export) is checked by its module in
peft_export/methods/, picked by ``peft_type``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError, UnsafeModelError
from ..methods import AdapterConfig, method_for
from .st_config import read_json

__all__ = ["AdapterConfig", "adapter_weights_path", "check_adapter_config", "read_adapter_config"]

_DEFAULT_MEGATRON_CORE = "megatron.core"


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
    method = method_for(raw.get("peft_type"), where)
    if raw.get("auto_mapping") and not _is_transformers_auto_mapping(raw["auto_mapping"]):
        raise UnsafeModelError(
            f"{where}: 'auto_mapping' is {raw['auto_mapping']!r}; it makes PEFT import a class from outside "
            "transformers, refused"
        )
    if raw.get("megatron_config") or raw.get("megatron_core", _DEFAULT_MEGATRON_CORE) != _DEFAULT_MEGATRON_CORE:
        raise UnsafeModelError(f"{where}: 'megatron_config'/'megatron_core' would import Megatron code, refused")
    if raw.get("trust_remote_code"):
        raise UnsafeModelError(f"{where}: 'trust_remote_code' is set inside the adapter config, refused")
    return method.parse_config(raw, where)  # the method's own fields, and the options it cannot export


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
