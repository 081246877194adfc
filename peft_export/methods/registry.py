"""The PEFT methods peft_export exports, by ``peft_type``, the methods refused by name with the reason, and the
one refusal of every other method."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .adalora import ADALORA
from .adamss import ADAMSS
from .base import PeftMethod
from .beft import BEFT
from .c3a import C3A
from .deft import DEFT
from .delora import DELORA
from .fourierft import FOURIERFT
from .frod import FROD
from .glora import GLORA
from .gralora import GRALORA
from .hira import HIRA
from .hra import HRA
from .ia3 import IA3
from .loha import LOHA
from .lokr import LOKR
from .ln_tuning import LN_TUNING
from .lora import LORA
from .miss import MISS
from .oft import BOFT, OFT
from .osf import OSF
from .peanut import PEANUT
from .psoft import PSOFT
from .pvera import PVERA
from .randlora import RANDLORA
from .road import ROAD
from .shira import SHIRA
from .supertuning import SUPERTUNING
from .tinylora import TINYLORA
from .trainable_tokens import TRAINABLE_TOKENS
from .unilora import UNILORA
from .vera import VERA
from .vblora import VBLORA
from .waveft import WAVEFT

_METHODS: dict[str, PeftMethod] = {m.peft_type: m for m in (LORA, ADALORA, IA3, LOHA, LOKR, OFT, BOFT, VERA,
                                                            FOURIERFT, HRA, MISS, C3A, RANDLORA, SHIRA, DELORA,
                                                            GRALORA, VBLORA, ROAD, WAVEFT, LN_TUNING, BEFT, DEFT,
                                                            HIRA, PVERA, TRAINABLE_TOKENS, PEANUT,
                                                            SUPERTUNING, TINYLORA, OSF, UNILORA, PSOFT, GLORA, ADAMSS,
                                                            FROD)}

_PROMPTS = "it learns virtual tokens fed to the model with the input, not weights that can be merged into the base"
# Methods PEFT cannot merge into the base weights (no merge_and_unload), by peft_type: (name, why).
NOT_MERGEABLE: dict[str, tuple[str, str]] = {
    "PROMPT_TUNING": ("prompt tuning", _PROMPTS),
    "PREFIX_TUNING": ("prefix tuning", "it learns key/value prefixes for every attention layer, not weights that "
                                       "can be merged into the base"),
    "P_TUNING": ("p-tuning", _PROMPTS),
    "MULTITASK_PROMPT_TUNING": ("multitask prompt tuning", _PROMPTS),
    "CPT": ("context-aware prompt tuning", _PROMPTS),
    "ADAPTION_PROMPT": ("adaption prompt", "it adds gated prompt attention to the layers, which has no merged form"),
    "XLORA": ("X-LoRA", "a learned classifier mixes its LoRA experts per token, so the update depends on the input"),
    "POLY": ("Poly", "it routes between LoRA modules by task id at run time, so there is no single update to merge"),
    "LILY": ("Lily", "a router mixes its shared experts per input, and PEFT 0.21's Lily layers have no merge "
                     "(measured: merge_and_unload raises NotImplementedError)"),
}


def supported_peft_types() -> tuple[str, ...]:
    return tuple(_METHODS)


def method_for(peft_type: Any, where: str = "adapter_config.json") -> PeftMethod:
    """The method module for ``peft_type`` (adapter_config.json's field); ConfigError for any other, with the
    reason for the methods that cannot be merged."""
    method = _METHODS.get(peft_type) if isinstance(peft_type, str) else None
    if method is not None:
        return method
    if isinstance(peft_type, str) and peft_type in NOT_MERGEABLE:
        name, why = NOT_MERGEABLE[peft_type]
        raise ConfigError(f"{where}: peft_type is {peft_type!r} ({name}): {why}, so peft_export cannot export it. "
                          f"It exports {', '.join(_METHODS)} adapters.")
    raise ConfigError(f"{where}: peft_type is {peft_type!r}; peft_export supports {', '.join(_METHODS)} adapters only")


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
