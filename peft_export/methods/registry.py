"""The PEFT methods peft_export exports, by ``peft_type``, and the one refusal of every other method."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import PeftMethod
from .lora import LORA

_METHODS: dict[str, PeftMethod] = {LORA.peft_type: LORA}


def supported_peft_types() -> tuple[str, ...]:
    return tuple(_METHODS)


def method_for(peft_type: Any, where: str = "adapter_config.json") -> PeftMethod:
    """The method module for ``peft_type`` (adapter_config.json's field); ConfigError for any other."""
    method = _METHODS.get(peft_type) if isinstance(peft_type, str) else None
    if method is None:
        raise ConfigError(
            f"{where}: peft_type is {peft_type!r}; peft_export supports {', '.join(_METHODS)} adapters only"
        )
    return method


def method_names(mode: str | None = None) -> str:
    """The names of the methods exported in ``mode`` ("merged", "switchable", None: any), for help texts:
    "LoRA", "LoRA or IA3", "LoRA, DoRA or IA3"."""
    names = [m.name for m in _METHODS.values() if mode is None or getattr(m, mode).supported]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def register_method(method: PeftMethod) -> PeftMethod:
    """Add ``method`` to the registry (refusing a second method for the same peft_type); returns it."""
    if method.peft_type in _METHODS and _METHODS[method.peft_type] is not method:
        raise ValueError(f"peft_type {method.peft_type!r} already has a method: {_METHODS[method.peft_type].name}")
    _METHODS[method.peft_type] = method
    return method


def unregister_method(peft_type: str) -> None:
    _METHODS.pop(peft_type, None)
