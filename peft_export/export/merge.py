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

# PEFT saves LoRA tensors as "<prefix>.<module path>.lora_A.weight" (no adapter name in the key).
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\."
    r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.weight)?$"
)


# Heads whose output no sentence embedding reads (pooling uses last_hidden_state). LoRA on them
# (target_modules=["dense"] also hits BERT's pooler.dense) has no effect on the embeddings, so if the base checkpoint
# has no such head their tensors are skipped instead of being reported as modules the base lacks.
_UNUSED_HEADS = ("pooler",)


def load_base_encoder(folder: Path, trust_remote_code: bool = False) -> nn.Module:
    """The transformers encoder in fp32, eval mode, from safetensors only, loaded as its family's registry entry
    says (export/families.py: eager attention; the key/value cache off for decoders)."""
    from transformers import AutoConfig, AutoModel

    from .families import family_for

    # Loaded exactly as sentence-transformers loads it (pooler included), so adapter keys line up with the
    # modules PEFT saw at training time; the pooler output is unused and drops out of the traced graph.
    try:
        model_type = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code).model_type
        model = AutoModel.from_pretrained(
            str(folder),
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **family_for(model_type).load_kwargs(),
        )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"{folder} needs custom code (trust_remote_code). It is off by default; pass --trust-remote-code "
                "only if you trust this repository."
            ) from err
        raise
    return model.eval()


def uses_token_type_ids(model: nn.Module, tokenizer) -> bool:
    """token_type_ids is a graph input only if the tokenizer emits it and the model's forward takes it."""
    accepts = "token_type_ids" in inspect.signature(model.forward).parameters
    return accepts and "token_type_ids" in getattr(tokenizer, "model_input_names", [])


def check_adapter_tensors(base: nn.Module, adapter: AdapterSource) -> None:
    """Refuse adapter tensors that are non-float, non-finite, mis-shaped, or aimed at modules the base lacks.

    PEFT itself only warns about keys it cannot place, so an adapter made for another base could otherwise
    load into garbage.
    """
    from safetensors import safe_open

    modules = dict(base.named_modules())
    with safe_open(str(adapter.weights), framework="pt") as fh:
        keys = sorted(fh.keys())
        if not keys:
            raise ConfigError(f"{adapter.weights} holds no tensors")
        for key in keys:
            tensor = fh.get_tensor(key)
            match = _LORA_KEY.match(key)
            if match is None:
                raise ConfigError(
                    f"{adapter.weights}: tensor {key!r} is not a LoRA weight (lora_A/lora_B); only plain LoRA "
                    "adapters are exported (modules_to_save and other extras are refused)"
                )
            if not tensor.is_floating_point():
                raise ConfigError(f"{adapter.weights}: tensor {key!r} has dtype {tensor.dtype}, expected a float type")
            if not torch.isfinite(tensor).all():
                raise ConfigError(f"{adapter.weights}: tensor {key!r} contains NaN or Inf values")
            module_name, part = match.group("module"), match.group("part")
            target = modules.get(module_name)
            if target is None and module_name.split(".", 1)[0] in _UNUSED_HEADS:
                continue  # e.g. BERT's pooler absent from this checkpoint; its output is never used
            if target is None:
                raise ConfigError(
                    f"{adapter.weights}: tensor {key!r} targets module {module_name!r}, which the base model "
                    f"({type(base).__name__}) does not have; was this adapter trained on another base?"
                )
            _check_lora_shape(adapter, key, part, tensor.shape, target)


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
    if not rank and (shape[0] if part == "lora_A" else shape[1]) != adapter.config.r:
        raise ConfigError(
            f"{adapter.weights}: {key!r} has shape {tuple(shape)}, rank differs from r={adapter.config.r}")


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


def _check_targets_exist(base: nn.Module, adapter: AdapterSource) -> None:
    """Refuse target_modules that name no module of the base, before PEFT raises its own (non-PeftExportError)
    ValueError. Same matching rule as PEFT: a list matches a module name or its last components, a string is a
    regular expression matched against the whole name."""
    targets = adapter.config.target_modules
    if targets == "all-linear":
        return
    names = [name for name, _ in base.named_modules() if name]
    if isinstance(targets, str):
        try:
            found = any(re.fullmatch(targets, name) for name in names)
        except re.error as err:
            raise ConfigError(
                f"Adapter {adapter.name!r}: target_modules {targets!r} is not a valid regex: {err}") from err
    else:
        found = any(name == t or name.endswith("." + t) for name in names for t in targets)
    if not found:
        raise ConfigError(
            f"Adapter {adapter.name!r}: target_modules {targets!r} match no module of the base model "
            f"({type(base).__name__}); was this adapter made for another base?"
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


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    value = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    return value if math.isfinite(value) else float("inf")
