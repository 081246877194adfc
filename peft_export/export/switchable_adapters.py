"""PEFT adapters -> the factors a switchable graph takes, and the references they are validated against.

The factors are the adapter's method's (peft_export/methods/: LoRA gives PEFT's own ``lora_A``, ``lora_B`` and
``scaling`` per module, so per-module ranks and alphas and rsLoRA's scaling are exactly what PEFT's forward uses).
Anything the graph's low-rank branches cannot reproduce exactly is refused by the method, naming the config key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from torch import nn

from ..errors import ConfigError
from ..methods import AdapterConfig, PeftMethod, is_unused_head, method_for
from ..methods.branch import Branch
from ..runtime.lora_layout import MAX_SAVED_ELEMENTS, Slot, as_branch, pack_factors
from ..source.resolve import AdapterSource, load_adapter_source, recorded_source
from . import validate
from ..tasks import EMBEDDING, Task
from .merge import check_adapter_tensors, merge_adapter


def check_switchable_config(config: AdapterConfig, where: str) -> None:
    """Refuse adapter configs whose effect a switchable graph cannot reproduce exactly, naming the key."""
    config.method.check_switchable(config, where)


def _peft_method(model: nn.Module, adapter_name: str) -> PeftMethod:
    peft_type = model.peft_config[adapter_name].peft_type
    return method_for(getattr(peft_type, "value", peft_type), f"adapter {adapter_name!r}")


def peft_branch_factors(model: nn.Module, adapter_name: str) -> dict[str, Branch]:
    """{module: Branch (A (r, in), B * scaling (out, r), scale vectors)} in float32 for one adapter of a
    PEFT-wrapped model.

    Module names are relative to the base model; heads the embedding never reads (BERT's pooler) are skipped.
    """
    method = _peft_method(model, adapter_name)
    factors = {}
    for name, module in method.peft_layers(model.get_base_model(), adapter_name):
        if not is_unused_head(name):
            factors[name] = method.branch_factors(module, adapter_name, name)
    if not factors:
        raise ConfigError(f"Adapter {adapter_name!r} has no {method.name} layer that reaches the embedding")
    return factors


def peft_saved_params(model: nn.Module, adapter_name: str) -> dict[str, np.ndarray]:
    """{base parameter name: the adapter's trained copy} of every module PEFT keeps a copy of for ``adapter_name``
    (``modules_to_save``), float32; heads the embedding never reads are skipped. Refuses copies larger than
    MAX_SAVED_ELEMENTS in all, naming the biggest module: every adapter file would carry it in full."""
    from peft.utils.other import ModulesToSaveWrapper

    copies: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}
    for name, module in model.get_base_model().named_modules():
        if not isinstance(module, ModulesToSaveWrapper) or adapter_name not in module.modules_to_save \
                or is_unused_head(name):
            continue
        for param_name, param in module.modules_to_save[adapter_name].named_parameters():
            copies[f"{name}.{param_name}"] = param.detach().float().numpy().copy()
            sizes[name] = sizes.get(name, 0) + param.numel()
    total = sum(sizes.values())
    if total > MAX_SAVED_ELEMENTS:
        biggest = max(sizes, key=sizes.__getitem__)
        found = (f"Adapter {adapter_name!r} trains full copies of {len(sizes)} module(s) (modules_to_save) with "
                 f"{total:,} values ({biggest!r}: {sizes[biggest]:,}); a switchable export carries them in every "
                 f"adapter file and allows {MAX_SAVED_ELEMENTS:,} values ({MAX_SAVED_ELEMENTS * 4 // 2**20} MiB in "
                 "float32) per adapter, for small modules such as a Dense layer or a classification head. Export "
                 "this adapter merged instead")
        raise ConfigError(f"{found} (export_onnx_model without switchable=True).").in_cli_words(
            f"{found} (merge-onnx without --switchable).")
    return copies


def scale_kinds(branches: list[dict[str, Branch]]) -> dict[str, set[str]]:
    """{module: the scale kinds any of these adapters' branches use there}: where the graph needs scale inputs."""
    kinds: dict[str, set[str]] = {}
    for factors in branches:
        for module, branch in factors.items():
            kinds.setdefault(module, set()).update(as_branch(branch).scales)
    return {module: found for module, found in kinds.items() if found}


def peft_targeted_layers(model: nn.Module) -> set[str]:
    """Names (relative to the base model) of the layers any adapter of a PEFT-wrapped model is on."""
    base = model.get_base_model()
    return {name for adapter_name in model.peft_config
            for name, _ in _peft_method(model, adapter_name).peft_layers(base, adapter_name)}


def adapter_modules(adapter: AdapterSource) -> set[str]:
    """Modules an adapter file has branch tensors for (pooler heads and the trained copies of modules_to_save, which
    the graph takes as saved-parameter inputs, excluded); refuses files that are not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(adapter.weights), framework="pt") as fh:
            keys = list(fh.keys())
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{adapter.weights} is not a readable safetensors file: {err}") from err
    method = adapter.config.method
    parsed = [method.parse_key(key, adapter.weights, explain=False) for key in keys
              if method.saved_copy_module(adapter.config, key) is None]
    return {key.module for key in parsed if not is_unused_head(key.module)}


def check_targets_in_graph(adapter: AdapterSource, slots: list[Slot]) -> None:
    """Every module the adapter has weights for must have a branch in the graph."""
    missing = sorted(adapter_modules(adapter) - {slot.module for slot in slots})
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        found = (f"Adapter {adapter.name!r} targets {missing[0]!r}{more}, which has no LoRA branch in this "
                 "switchable graph (the graph has branches only where the exported adapters had them). Re-export "
                 "with this adapter among the")
        spec = f"{adapter.name}={adapter.source}"
        raise ConfigError(f"{found} adapters: export_onnx_model(BASE, OUTPUT, switchable=True, adapters=[..., "
                          f"{spec!r}])").in_cli_words(
            f"{found} --adapter options: `peft-export merge-onnx BASE --switchable --adapter ... --adapter {spec}`.")


def _skeleton(slots: list[Slot]) -> nn.Module:
    """A module tree holding a Linear of the right shape at every slot, with uninitialised weights: enough for
    PEFT to place an adapter exactly as it would on the base, without the base's weights."""
    root = nn.Module()
    for slot in slots:
        parent = root
        *path, leaf = slot.module.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(slot.in_features, slot.out_features, device="meta"))
    return root.to_empty(device="cpu")


def convert_peft_adapter(spec: str, slots: list[Slot], name: str = "default", revision: str | None = None,
                         token: str | bool | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A PEFT adapter (folder or hub id) -> (graph inputs for ``slots``, summary), without the base model.

    Used by the runtime's ``load_adapter`` for adapters that were not converted at export time. Checks shapes and
    values and that every target has a branch, but cannot compare with the base model's outputs; exports and
    ``peft-export add-adapter`` do that.
    """
    from peft import PeftModel

    adapter = load_adapter_source(spec, name=name, revision=revision, token=token)
    check_switchable_config(adapter.config, str(adapter.folder / "adapter_config.json"))
    if adapter.config.raw.get("modules_to_save"):
        found = (f"Adapter {adapter.name!r} ({spec}) trains full copies of modules (modules_to_save), which "
                 "load_adapter cannot check without the base model. Add it to the export with")
        raise ConfigError(f"{found} peft_export.export.switchable_changes.add_adapter(FOLDER, {spec!r}), then load "
                          "it.").in_cli_words(f"{found} `peft-export add-adapter FOLDER {name}={spec}`, then load the "
                                              "written file.")
    if adapter.config.method.branch_needs_base_weights(adapter.config):
        found = (f"Adapter {adapter.name!r} ({adapter.config.method.name}, {spec}) needs the base model's weights to "
                 "be converted for a switchable graph (DoRA divides by the norm of the adapted weight), which "
                 "load_adapter does not have. Add it to the export with")
        raise ConfigError(f"{found} peft_export.export.switchable_changes.add_adapter(FOLDER, {spec!r}), then load it."
                          ).in_cli_words(f"{found} `peft-export add-adapter FOLDER {name}={spec}`, then load the "
                                         "written file.")
    check_targets_in_graph(adapter, slots)
    skeleton = _skeleton(slots)
    check_adapter_tensors(skeleton, adapter)
    model = PeftModel.from_pretrained(skeleton, str(adapter.folder), adapter_name=adapter.name, is_trainable=False)
    factors = peft_branch_factors(model, adapter.name)
    return pack_factors(slots, factors), adapter_summary(adapter, factors)


def adapter_summary(adapter: AdapterSource, factors: dict[str, Branch | tuple[np.ndarray, np.ndarray]]
                    ) -> dict[str, Any]:
    """What the manifest and embedding_config.json record about an adapter (``scales`` only where it has any)."""
    branches = {module: as_branch(value) for module, value in sorted(factors.items())}
    summary = {
        "source": recorded_source(adapter.source),
        "sha256": {adapter.weights.name: adapter.sha256},
        **adapter.config.summary(),
        "modules": sorted(factors),
        "ranks": {module: branch.rank for module, branch in branches.items() if branch.a is not None},
    }
    scales = {module: sorted(branch.scales) for module, branch in branches.items() if branch.scales}
    if scales:
        summary["scales"] = scales
    return summary


@dataclass
class AdapterReferences:
    """PyTorch outputs one adapter is validated against: eager PEFT, and the merged model of that adapter."""

    name: str
    eager: list[validate.ReferenceBatch]
    merged: list[validate.ReferenceBatch]
    effect: float  # largest change of the task's main output (normalised sentence embeddings, logits) vs the base
    merged_vs_eager: float
    task: Task = EMBEDDING  # what the graph's outputs are and how closely each is compared


def replay(batches: list[validate.ReferenceBatch]) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A runner that answers the validation batches in order with stored outputs (to compare two references)."""
    stored = iter(batches)

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = next(stored)
        return dict(batch.outputs)

    return run


def adapter_references(peft_model, name: str, make_pipeline: Callable[[nn.Module], nn.Module], tokenize,
                       base: list[validate.ReferenceBatch], task: Task = EMBEDDING) -> AdapterReferences:
    """Eager PEFT with ``name`` active, and a merged copy of the model with ``name`` merged (PEFT's merge), as
    ``task``'s outputs."""
    peft_model.set_adapter(name)
    eager = validate.reference_outputs(make_pipeline(peft_model), tokenize, task=task)
    validate.check_finite_outputs(eager, f"Adapter {name!r}")
    effect = validate.max_main_difference(base, replay(eager), task)
    merged_model = merge_adapter(copy.deepcopy(peft_model), name)
    merged = validate.reference_outputs(make_pipeline(merged_model), tokenize, task=task)
    del merged_model
    report = validate.compare_with_reference(eager, replay(merged), f"The merged model of adapter {name!r}",
                                             task=task)
    return AdapterReferences(name, eager, merged, effect, report.max_diff[task.outputs[0].name], task)


def validate_adapter_run(refs: AdapterReferences, run_graph) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
    """The switchable graph with one adapter vs eager PEFT and vs the merged model; returns (report, outputs)."""
    outputs = []

    def recording(feeds):
        out = run_graph(feeds)
        outputs.append(out)
        return out

    eager = validate.compare_with_reference(refs.eager, recording,
                                            f"The switchable graph with adapter {refs.name!r} (vs eager PEFT)",
                                            task=refs.task)
    merged = validate.compare_with_reference(refs.merged, replay_outputs(outputs),
                                             f"The switchable graph with adapter {refs.name!r} (vs the merged model)",
                                             task=refs.task)
    report = {
        "vs_eager_peft": eager.to_dict(),
        "vs_merged_pytorch": merged.max_diff,
        "merged_vs_eager_peft": refs.merged_vs_eager,
        "adapter_vs_base_max_abs_diff": refs.effect,
    }
    return report, outputs


def replay_outputs(outputs: list[dict[str, np.ndarray]]):
    stored = iter(outputs)
    return lambda feeds: next(stored)


def max_output_difference(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]],
                          batches: list[validate.ReferenceBatch], task: Task = EMBEDDING) -> float:
    """Largest difference of the task's main output (normalised sentence embeddings, logits) between two runs over
    ``batches``' inputs."""
    main = task.outputs[0]
    return max(float(main.difference(x[main.name], y[main.name], ref.feeds["attention_mask"]))
               for x, y, ref in zip(a, b, batches))
