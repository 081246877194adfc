"""Load the base encoder in fp32, attach PEFT adapters, check their tensors, and merge with PEFT's own code."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..source.resolve import AdapterSource
from ..tasks import EMBEDDING, Task

# PEFT saves LoRA tensors as "<prefix>.<module path>.lora_A.weight" (no adapter name in the key).
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\."
    r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.weight)?$"
)


# Heads whose output no sentence embedding reads (pooling uses last_hidden_state). LoRA on them
# (target_modules=["dense"] also hits BERT's pooler.dense) has no effect on the embeddings, so if the base checkpoint
# has no such head their tensors are skipped instead of being reported as modules the base lacks.
_UNUSED_HEADS = ("pooler",)


def load_base_encoder(folder: Path, trust_remote_code: bool = False, task: Task = EMBEDDING) -> nn.Module:
    """The transformers model in fp32, eval mode, from safetensors only, with the task's auto class (tasks/), loaded
    as its family's registry entry says (export/families.py: eager attention; the key/value cache off for
    decoders)."""
    import transformers
    from transformers import AutoConfig

    from .families import family_for

    from .quiet import quiet_loading_bars

    quiet_loading_bars()

    # Loaded exactly as sentence-transformers loads it (pooler included), so adapter keys line up with the
    # modules PEFT saw at training time; the pooler output is unused and drops out of the traced graph.
    try:
        model_type = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code).model_type
        model = getattr(transformers, task.transformers_auto_class).from_pretrained(
            str(folder),
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **family_for(model_type).load_kwargs(),
        )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            needs = f"{folder} needs custom code (trust_remote_code). It is off by default; pass"
            raise ConfigError(f"{needs} trust_remote_code=True only if you trust this repository.").in_cli_words(
                f"{needs} --trust-remote-code only if you trust this repository.") from err
        raise
    return model.eval()


def uses_token_type_ids(model: nn.Module, tokenizer) -> bool:
    """token_type_ids is a graph input only if the tokenizer emits it and the model's forward takes it."""
    accepts = "token_type_ids" in inspect.signature(model.forward).parameters
    return accepts and "token_type_ids" in getattr(tokenizer, "model_input_names", [])


def check_adapter_tensors(base: nn.Module, adapter: AdapterSource) -> None:
    """Refuse adapter tensors that are non-float, non-finite, mis-shaped, or aimed at modules the base lacks, and
    adapters missing the lora_A/lora_B pair of a module their target_modules declare.

    PEFT itself only warns about keys it cannot place or that are missing, so an adapter made for another base, or
    one with tensors deleted, could otherwise load into garbage or silently leave layers unchanged.
    """
    from safetensors import SafetensorError, safe_open

    modules = dict(base.named_modules())
    found: dict[str, set[str]] = {}
    prefix = ""
    try:
        with safe_open(str(adapter.weights), framework="pt") as fh:
            keys = sorted(fh.keys())
            if not keys:
                raise ConfigError(f"{adapter.weights} holds no tensors")
            for key in keys:
                match = _LORA_KEY.match(key)
                if match is None:
                    raise ConfigError(
                        f"{adapter.weights}: tensor {key!r} is not a LoRA weight (lora_A/lora_B); only plain LoRA "
                        "adapters are exported (modules_to_save and other extras are refused)"
                    )
                tensor = fh.get_tensor(key)
                _check_tensor(adapter, key, tensor, match, modules, base)
                prefix = key[: match.start("module")]
                found.setdefault(match.group("module"), set()).add(match.group("part"))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{adapter.weights} is not a readable safetensors file: {err}") from err
    _check_pairs_complete(adapter, found, targeted_modules(base, adapter), prefix)


def _check_tensor(adapter: AdapterSource, key: str, tensor: torch.Tensor, match: re.Match, modules: dict,
                  base: nn.Module) -> None:
    if not tensor.is_floating_point():
        raise ConfigError(f"{adapter.weights}: tensor {key!r} has dtype {tensor.dtype}, expected a float type")
    if not torch.isfinite(tensor).all():
        raise ConfigError(f"{adapter.weights}: tensor {key!r} contains NaN or Inf values")
    module_name, part = match.group("module"), match.group("part")
    target = modules.get(module_name)
    if target is None and module_name.split(".", 1)[0] in _UNUSED_HEADS:
        return  # e.g. BERT's pooler absent from this checkpoint; its output is never used
    if target is None:
        raise ConfigError(
            f"{adapter.weights}: tensor {key!r} targets module {module_name!r}, which the base model "
            f"({type(base).__name__}) does not have; was this adapter trained on another base?"
        )
    _check_lora_shape(adapter, key, part, tensor.shape, target)


def _check_pairs_complete(adapter: AdapterSource, found: dict[str, set[str]], targeted: dict[str, nn.Module],
                          prefix: str) -> None:
    """Every module the config's target_modules match must have both lora_A and lora_B in the file."""
    for module in sorted(set(targeted) | set(found)):
        if module.split(".", 1)[0] in _UNUSED_HEADS:
            continue  # never read by a sentence embedding
        for part in ("lora_A", "lora_B"):
            if part not in found.get(module, ()):
                raise ConfigError(
                    f"{adapter.weights}: tensor {prefix}{module}.{part}.weight is missing: target_modules "
                    f"{adapter.config.target_modules!r} put a LoRA on {module!r}, but the file has no complete "
                    "lora_A/lora_B pair for it. The file is incomplete or belongs to another adapter; save the "
                    "adapter again."
                )


def _check_lora_shape(adapter: AdapterSource, key: str, part: str, shape, target: nn.Module) -> None:
    if not isinstance(target, nn.Linear) or part not in ("lora_A", "lora_B"):
        raise ConfigError(
            f"{adapter.weights}: {key!r} targets a {type(target).__name__}; only Linear layers are supported")
    rank = adapter.config.raw.get("rank_pattern") or {}
    if len(shape) != 2:
        raise ConfigError(f"{adapter.weights}: {key!r} has shape {tuple(shape)}, expected a matrix")
    if part == "lora_A" and shape[1] != target.in_features:
        raise ConfigError(
            f"{adapter.weights}: {key!r} has shape {tuple(shape)} but the base layer takes {target.in_features} "
            "inputs; was this adapter trained on another base?"
        )
    if part == "lora_B" and shape[0] != target.out_features:
        raise ConfigError(
            f"{adapter.weights}: {key!r} has shape {tuple(shape)} but the base layer has {target.out_features} "
            "outputs; was this adapter trained on another base?"
        )
    from peft.utils.other import get_pattern_key

    module = _LORA_KEY.match(key).group("module")
    pattern = get_pattern_key(list(rank), module)  # PEFT's own rule: the first rank_pattern key matching the name
    expected = rank.get(pattern, adapter.config.r)
    if (shape[0] if part == "lora_A" else shape[1]) != expected:
        source = f"rank_pattern[{pattern!r}]={expected}" if pattern in rank else f"r={expected}"
        raise ConfigError(
            f"{adapter.weights}: {key!r} has shape {tuple(shape)}, but adapter_config.json gives {module!r} rank "
            f"{source}; the config and the weights disagree (was the config edited?)")


def attach_adapters(base: nn.Module, adapters: list[AdapterSource]):
    """Wrap ``base`` in a PeftModel holding every adapter; the first one is active."""
    from peft import PeftModel

    for adapter in adapters:
        _check_targets_exist(base, adapter)
        check_adapter_tensors(base, adapter)
    first, *rest = adapters
    model = PeftModel.from_pretrained(base, str(first.folder), adapter_name=first.name, is_trainable=False)
    for adapter in rest:
        model.load_adapter(str(adapter.folder), adapter_name=adapter.name, is_trainable=False)
    _check_targets_matched(model, adapters)
    return model.eval()


def targeted_modules(base: nn.Module, adapter: AdapterSource) -> dict[str, nn.Module]:
    """The modules of ``base`` PEFT puts this adapter's LoRA on, by PEFT's own matching rule (list entries match a
    name or its last components, a string is a full-match regex; exclude_modules and layers_to_transform apply)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    fields = set(LoraConfig.__dataclass_fields__)
    try:
        config = LoraConfig(**{k: v for k, v in adapter.config.raw.items() if k in fields and k != "peft_type"})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{adapter.folder / 'adapter_config.json'}: PEFT refuses this LoRA config: {err}") from err
    if config.target_modules == "all-linear":
        return {name: m for name, m in base.named_modules() if isinstance(m, nn.Linear)}
    try:
        return {name: m for name, m in base.named_modules() if name and check_target_module_exists(config, name)}
    except re.error as err:
        raise ConfigError(
            f"Adapter {adapter.name!r}: target_modules {config.target_modules!r} is not a valid regex: {err}"
        ) from err


def _linear_names(base: nn.Module) -> str:
    names = sorted({name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, nn.Linear)})
    return ", ".join(names) or "none"


def _check_targets_exist(base: nn.Module, adapter: AdapterSource) -> None:
    """Refuse target_modules that name no module of the base, or match modules LoRA cannot be exported on, before
    PEFT raises its own (non-PeftExportError) errors or, worse, wraps nothing and exports a no-op."""
    targets = adapter.config.target_modules
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    described = f"{type(base).__name__}" + (f", model_type {model_type!r}" if model_type else "")
    targeted = targeted_modules(base, adapter)
    if not targeted:
        raise ConfigError(
            f"Adapter {adapter.name!r}: target_modules {targets!r} match no module of the base model "
            f"({described}), whose Linear layers are named: {_linear_names(base)}. Was this adapter made for another "
            "base, or for another implementation of it (remote code vs the class transformers has built in)?"
        )
    for name, module in targeted.items():
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"Adapter {adapter.name!r}: target_modules {targets!r} match {name!r}, a {type(module).__name__}; "
                f"LoRA is exported on Linear layers only. The Linear layers of {described} are named: "
                f"{_linear_names(base)}."
            )


def _check_targets_matched(model, adapters: list[AdapterSource]) -> None:
    from peft.tuners.lora import LoraLayer

    for adapter in adapters:
        hits = [m for m in model.modules() if isinstance(m, LoraLayer) and adapter.name in m.lora_A]
        if not hits:
            raise ConfigError(
                f"Adapter {adapter.name!r}: target_modules {adapter.config.target_modules!r} match no layer of the base"
            )


def merge_adapter(peft_model, adapter_name: str) -> nn.Module:
    """Merge one adapter into the base weights with PEFT (safe_merge checks for NaN) and return the plain model.

    The base was loaded in fp32, so PEFT computes each delta B @ A * scaling in fp32 before adding it.
    """
    peft_model.set_adapter(adapter_name)
    merged = peft_model.merge_and_unload(safe_merge=True, adapter_names=[adapter_name])
    for name, param in merged.named_parameters():
        if not torch.isfinite(param).all():
            raise ConfigError(f"Merging adapter {adapter_name!r} produced NaN/Inf in {name}")
    return merged.eval()


def nonfinite_hint(adapter: AdapterSource) -> str:
    """Why an adapter's outputs may overflow: its LoRA scaling, from adapter_config.json."""
    return (f": its scaling lora_alpha / r = {adapter.config.lora_alpha:g} / {adapter.config.r} = "
            f"{adapter.config.scaling:.3g} (or its weights) overflow float32. Check lora_alpha and r in "
            f"{adapter.folder / 'adapter_config.json'}")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    value = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    return value if math.isfinite(value) else float("inf")
