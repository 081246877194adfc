"""Load the base encoder in fp32, attach PEFT adapters, check their tensors, and merge with PEFT's own code.

What differs per PEFT method (tensor names and shapes, PEFT's config and layer classes) is asked of the adapter's
method module (peft_export/methods/); the rest is PEFT's method-agnostic API (PeftModel, merge_and_unload)."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..methods import BaseLayer, TensorInfo
from ..source.resolve import AdapterSource
from ..tasks import EMBEDDING, Task

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
        model, loading = getattr(transformers, task.transformers_auto_class).from_pretrained(
            str(folder),
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, naming the parameter, instead of a bare RuntimeError
            **family_for(model_type).load_kwargs(),
        )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            needs = f"{folder} needs custom code (trust_remote_code). It is off by default; pass"
            raise ConfigError(f"{needs} trust_remote_code=True only if you trust this repository.").in_cli_words(
                f"{needs} --trust-remote-code only if you trust this repository.") from err
        raise
    _check_nothing_initialised(folder, model, task, loading)
    return model.eval()


def _check_nothing_initialised(folder: Path, model: nn.Module, task: Task, loading: dict) -> None:
    """Refuse a checkpoint whose weights transformers would initialise at random: one whose config.json gives a
    parameter another shape than its weights have (a head saved with 1 label, a config naming 3), and, for a task
    with a head of its own (a reranker's classifier), one that lacks the head's weights (an embedding model given
    as a CrossEncoder adapter's base), which would score with noise. An embedding export reads no head, so its base
    may lack one."""
    mismatched = sorted(loading.get("mismatched_keys") or (), key=str)
    if mismatched:
        name, saved, expected = mismatched[0]
        raise ConfigError(
            f"{folder}: the weights hold {name} with shape {tuple(saved)}, but config.json makes it "
            f"{tuple(expected)} (for a classification head: num_labels / id2label); config.json does not match the "
            "weights. Save the model again, or correct config.json")
    missing = loading.get("missing_keys") or []
    if task is EMBEDDING or not missing:
        return
    names = sorted(missing)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise ConfigError(
        f"{folder} has no weights for {shown}, which {type(model).__name__} needs for the {task.name} task "
        f"({task.sentence_transformers_class}); transformers would initialise them at random. Is this the base the "
        "model or adapter was made from? A reranker's base is a CrossEncoder or a ...ForSequenceClassification "
        "model, not a sentence embedding model")


def uses_token_type_ids(model: nn.Module, tokenizer) -> bool:
    """token_type_ids is a graph input only if the tokenizer emits it and the model's forward takes it."""
    accepts = "token_type_ids" in inspect.signature(model.forward).parameters
    return accepts and "token_type_ids" in getattr(tokenizer, "model_input_names", [])


def check_adapter_tensors(base: nn.Module, adapter: AdapterSource) -> None:
    """Refuse adapter tensors that are non-float, non-finite, mis-shaped, or aimed at modules the base lacks, and
    adapters missing a tensor of a module their target_modules declare (the checks are the method's:
    PeftMethod.check_tensors).

    PEFT itself only warns about keys it cannot place or that are missing, so an adapter made for another base, or
    one with tensors deleted, could otherwise load into garbage or silently leave layers unchanged.
    """
    from safetensors import SafetensorError, safe_open

    layers = {name: _base_layer(module) for name, module in base.named_modules()}
    params = {name: tuple(param.shape) for name, param in base.named_parameters()}
    config = adapter.config
    try:
        with safe_open(str(adapter.weights), framework="pt") as fh:
            config.method.check_tensors(config, adapter.weights, sorted(fh.keys()),
                                        lambda key: _tensor_info(fh.get_tensor(key)), layers, type(base).__name__,
                                        lambda: targeted_modules(base, adapter), params)
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{adapter.weights} is not a readable safetensors file: {err}") from err


def _base_layer(module: nn.Module) -> BaseLayer:
    weight = getattr(module, "weight", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    return BaseLayer(type(module).__name__, isinstance(module, nn.Linear), shape,
                     isinstance(getattr(module, "bias", None), torch.Tensor))


def _tensor_info(tensor: torch.Tensor) -> TensorInfo:
    is_float = tensor.is_floating_point()
    ranges = None
    if not is_float and tensor.dim() >= 1 and tensor.numel():  # integer indices (SHiRA): bounds per row
        rows = tensor.reshape(tensor.shape[0], -1).long()  # (rows, entries)
        ranges = tuple((int(low), int(high)) for low, high in zip(rows.min(dim=1).values, rows.max(dim=1).values))
    return TensorInfo(tuple(tensor.shape), str(tensor.dtype), is_float,
                      bool(torch.isfinite(tensor).all()) if is_float else True, ranges)


def attach_adapters(base: nn.Module, adapters: list[AdapterSource]):
    """Wrap ``base`` in a PeftModel holding every adapter; the first one is active."""
    from peft import PeftModel

    for adapter in adapters:
        adapter.config.method.check_mergeable(adapter.config, str(adapter.folder / "adapter_config.json"))
        _check_targets_exist(base, adapter)
        check_adapter_tensors(base, adapter)
    first, *rest = adapters
    model = PeftModel.from_pretrained(base, str(first.folder), adapter_name=first.name, is_trainable=False,
                                      config=_config_without_task_wrapper(first))
    for adapter in rest:
        model.load_adapter(str(adapter.folder), adapter_name=adapter.name, is_trainable=False)
    _check_targets_matched(model, adapters)
    return model.eval()


def _config_without_task_wrapper(adapter: AdapterSource):
    """The adapter's PEFT config with ``task_type`` cleared, so that PEFT wraps the base in a plain PeftModel.

    PEFT's task wrappers add modules of their own to ``modules_to_save`` whatever adapter_config.json says
    (SEQ_CLS: ``classifier`` and ``score``), and then fail with a KeyError on an adapter saved without them, as
    sentence-transformers' ``CrossEncoder.add_adapter(LoraConfig(task_type="SEQ_CLS"))`` saves it. The file's own
    ``modules_to_save`` is what was trained: it is honoured as written (its tensors were checked by
    check_adapter_tensors), exactly as transformers' ``load_adapter`` (sentence-transformers' eager path) reads it.
    """
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter.folder))
    config.task_type = None
    return config


def targeted_modules(base: nn.Module, adapter: AdapterSource) -> dict[str, nn.Module]:
    """The modules of ``base`` PEFT puts this adapter on, by PEFT's own matching rule (list entries match a
    name or its last components, a string is a full-match regex; exclude_modules and layers_to_transform apply)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    method = adapter.config.method
    config_class = method.peft_config_class()
    fields = set(config_class.__dataclass_fields__)
    try:
        config = config_class(**{k: v for k, v in adapter.config.raw.items() if k in fields and k != "peft_type"})
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{adapter.folder / 'adapter_config.json'}: PEFT refuses this {method.name} config: {err}") from err
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
    """Refuse target_modules that name no module of the base, or match modules the method cannot be exported on,
    before PEFT raises its own (non-PeftExportError) errors or, worse, wraps nothing and exports a no-op."""
    method = adapter.config.method
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
        if not method.supports_layer(_base_layer(module)):
            raise ConfigError(
                f"Adapter {adapter.name!r}: target_modules {targets!r} match {name!r}, a {type(module).__name__}; "
                f"{method.name} is exported on {method.layer_kinds} only. The Linear layers of {described} are named: "
                f"{_linear_names(base)}."
            )


def _check_targets_matched(model, adapters: list[AdapterSource]) -> None:
    for adapter in adapters:
        if not adapter.config.method.peft_layers(model, adapter.name):
            raise ConfigError(
                f"Adapter {adapter.name!r}: target_modules {adapter.config.target_modules!r} match no layer of the base"
            )


def merge_adapter(peft_model, adapter_name: str | list[str]) -> nn.Module:
    """Merge one adapter, or a stack of them (a list: PEFT merges each in turn, as it runs them all active), into the
    base weights with PEFT (safe_merge checks for NaN) and return the plain model.

    The base was loaded in fp32, so PEFT computes each delta (LoRA: B @ A * scaling) in fp32 before adding it.
    """
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if isinstance(adapter_name, str):
        peft_model.set_adapter(adapter_name)
    merged = peft_model.merge_and_unload(safe_merge=True, adapter_names=names)
    for name, param in merged.named_parameters():
        if not torch.isfinite(param).all():
            raise ConfigError(f"Merging adapter {' + '.join(map(repr, names))} produced NaN/Inf in {name}")
    return merged.eval()


def nonfinite_hint(adapter: AdapterSource) -> str:
    """Why an adapter's outputs may overflow (LoRA: its scaling), from adapter_config.json."""
    return adapter.config.method.nonfinite_hint(adapter.config, adapter.folder / "adapter_config.json")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    value = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    return value if math.isfinite(value) else float("inf")
