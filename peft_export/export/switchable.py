"""Switchable exports: one base graph with LoRA branches plus one adapter weight file per adapter, for ONNX Runtime
(``model.onnx`` + ``.onnx_adapter`` files) or OpenVINO (``openvino_model.xml`` + ``.safetensors`` files); and
``add-adapter`` / ``remove-adapter`` on an existing export, which never touch its graph.

Validation, before anything is declared done (at export and at add-adapter):

* every adapter through the switchable graph equals eager PEFT with that adapter active, and the PyTorch model
  with that adapter merged (the task's outputs within their tolerances: normalised sentence embeddings, a
  reranker's logits and scores, within 1e-5);
* the graph with no adapter equals the base model (the task's main output within 1e-6);
* adapters differ from the base and from each other (unless --allow-noop-adapter).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, ValidationError
from ..runtime.atomic_file import write_json
from ..runtime.backends import detect_backend
from ..runtime.config import MANIFEST_FILE, RuntimeConfig
from ..runtime.lora_layout import SavedParam, Slot, pack_factors, pack_saved
from ..runtime.tokenizer import TextTokenizer
from ..source.resolve import AdapterSource, describe_base, recorded_source, resolve_model, sha256_file
from ..tasks import EMBEDDING, Task
from . import dependencies, validate  # noqa: F401 (dependencies first: without torch, an error naming the extra)
from .manifest import export_manifest, record_file_hashes
from .output_folder import atomic_output_folder, check_output_target, folder_size
from .tokenizer_files import check_runtime_tokenizer, save_tokenizer
from .families import family_of
from .pipeline import (NOOP_ADAPTER_THRESHOLD, ExportOptions, ExportResult, PreparedExport, noop_adapter_error,
                       prepare_export)
from .switchable_folder import MERGE_MODE, adapter_file, graph_files
from .switchable_adapters import (AdapterReferences, adapter_references, adapter_summary, check_switchable_config,
                                  max_output_difference, peft_branch_factors, peft_saved_params,
                                  peft_targeted_layers, scale_kinds, validate_adapter_run)

logger = logging.getLogger(__name__)

_RUNTIME_KEYS = ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "modules", "ranks", "scales",
                 "saved_params")


def adapter_writer(backend: str) -> tuple[str, Callable[[Path, dict], None]]:
    """(file suffix, writer) of the adapter files the runtime ``backend`` reads."""
    if backend == "openvino":
        from ..runtime.openvino_adapters import ADAPTER_SUFFIX, write_adapter_file
    else:
        from ..runtime.onnxruntime_adapters import ADAPTER_SUFFIX, write_adapter_file
    return ADAPTER_SUFFIX, write_adapter_file


def _open_graph(folder: Path, config: RuntimeConfig):
    """The runtime backend the folder was exported for, with exact arithmetic (OpenVINO: the f32 hint)."""
    if detect_backend(config) == "openvino":
        from .openvino import compile_f32

        return compile_f32(folder / config.model_file)
    from ..runtime.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(folder / config.model_file, lora_inputs=True)


def base_references(peft_model, prepared: PreparedExport) -> list[validate.ReferenceBatch]:
    with peft_model.disable_adapter():
        return validate.reference_outputs(prepared.make_pipeline(peft_model), prepared.ref_tokenize,
                                          task=prepared.task)


def check_effect(refs: AdapterReferences, allow_noop: bool) -> None:
    if refs.effect < NOOP_ADAPTER_THRESHOLD and not allow_noop:
        raise noop_adapter_error(refs.name, refs.effect)


def convert_adapter(peft_model, adapter: AdapterSource, slots: list[Slot], factors: dict | None = None,
                    saved: list[SavedParam] = ()) -> tuple[dict, dict[str, Any]]:
    """The adapter's graph inputs (its branches, scales and saved copies) and its summary."""
    factors = peft_branch_factors(peft_model, adapter.name) if factors is None else factors
    copies = peft_saved_params(peft_model, adapter.name)
    summary = adapter_summary(adapter, factors)
    if copies:
        summary["saved_params"] = sorted(copies)
    return {**pack_factors(slots, factors), **pack_saved(list(saved), copies)}, summary


def attach_by_method(encoder, adapters: list[AdapterSource], attach: Callable) -> dict[str, Any]:
    """{adapter name: the PeftModel holding it}. PEFT holds adapters of one peft_type per model ("Cannot combine
    adapters with different peft types"), so a mix of methods gets one PeftModel per method, each on its own copy
    of ``encoder`` (copied before any is wrapped: wrapping changes the model in place)."""
    import copy

    groups: dict[str, list[AdapterSource]] = {}
    for adapter in adapters:
        groups.setdefault(adapter.config.peft_type, []).append(adapter)
    encoders = [encoder] + [copy.deepcopy(encoder) for _ in range(len(groups) - 1)]
    models = {}
    for group, base in zip(groups.values(), encoders):
        model = attach(base, group)
        models.update((adapter.name, model) for adapter in group)
    return models


def validate_switchable_graph(folder: Path, config: RuntimeConfig, base: list[validate.ReferenceBatch],
                              candidates: dict[str, tuple[Path, AdapterReferences]], existing: dict[str, Path],
                              allow_duplicates: bool, task: Task = EMBEDDING) -> dict[str, Any]:
    """Run the graph in ``folder`` without an adapter, with each candidate adapter file (checked against its
    references), and with each existing adapter file (for the pairwise difference); raise on any failure."""
    backend = _open_graph(folder, config)
    main = task.outputs[0]
    report = validate.compare_with_reference(
        base, backend.run, "The switchable graph without an adapter (vs the base model)",
        tolerances={main.name: main.base_tolerance}, task=task,
    )
    outputs: dict[str, list] = {}
    per_adapter: dict[str, Any] = {}
    for name, (path, refs) in candidates.items():
        handle = backend.load_adapter(path)
        per_adapter[name], outputs[name] = validate_adapter_run(refs, lambda f, h=handle: backend.run(f, adapter=h))
    for name, path in existing.items():
        handle = backend.load_adapter(path)
        outputs[name] = [backend.run(ref.feeds, adapter=handle) for ref in base]
    pairs = {}
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a not in candidates and b not in candidates:
                continue
            diff = max_output_difference(outputs[a], outputs[b], base, task)
            pairs[f"{a} vs {b}"] = diff
            if diff < NOOP_ADAPTER_THRESHOLD and not allow_duplicates:
                same = (f"Adapters {a!r} and {b!r} give the same {main.description or main.name} (max difference "
                        f"{diff:.2g} < "
                        f"{NOOP_ADAPTER_THRESHOLD:g}); is one a copy of the other? Pass")
                raise ValidationError(f"{same} allow_noop_adapter=True to keep both.").in_cli_words(
                    f"{same} --allow-noop-adapter to keep both.")
    return {"no_adapter_vs_base": report.to_dict(), "adapters": per_adapter, "adapter_pair_max_abs_diff": pairs}


def _runtime_entry(name: str, summary: dict[str, Any], suffix: str) -> dict[str, Any]:
    return {"file": adapter_file(name, suffix), **{k: summary[k] for k in _RUNTIME_KEYS if k in summary}}


def adapter_manifest_entry(name: str, folder: Path, summary: dict[str, Any], validation: dict[str, Any],
                    suffix: str) -> dict[str, Any]:
    file = adapter_file(name, suffix)
    return {"name": name, "file": file, "file_sha256": sha256_file(folder / file), **summary,
            "validation": validation}


def _export_entry(backend: str, options: ExportOptions, config: RuntimeConfig, names: list[str],
                  suffix: str) -> dict[str, Any]:
    files = graph_files(config) + [adapter_file(n, suffix) for n in names]
    if backend != "openvino":
        return {"format": "onnx", "opset": options.opset, "dtype": "float32", "files": files}
    from importlib.metadata import version

    return {"format": "openvino", "weight_format": "fp32", "dtype": "float32", "files": files,
            "openvino_version": version("openvino"), "adapter_format": "safetensors",
            "converted_from": {"format": "onnx", "opset": options.opset}}


def run_switchable_export(options: ExportOptions, log: Callable[[str], None] = logger.info,
                          backend: str = "onnxruntime") -> ExportResult:
    """Export ``options.adapters`` as switchable adapters over one base graph for ``backend`` ("onnxruntime":
    model.onnx + .onnx_adapter files; "openvino": openvino_model.xml/.bin + .safetensors files)."""
    from .merge import attach_adapters
    from ..runtime.onnxruntime_fusion import AttentionShape
    from .switchable_graph import export_switchable_onnx, export_switchable_openvino, find_saved, find_slots

    started = time.perf_counter()
    if options.quantize:
        raise ConfigError(f"quantize={options.quantize!r} is not supported with switchable=True: export the adapters "
                          "in float32").in_cli_words(
            "--quantize is not supported with --switchable: export the adapters in float32")
    if options.dtype != "fp32":
        raise ConfigError(f"dtype={options.dtype!r} is not supported with switchable=True: export the adapters in "
                          "float32").in_cli_words(
            f"--dtype {options.dtype} is not supported with --switchable: export the adapters in float32")
    suffix, write_adapter_file = adapter_writer(backend)
    export_graph = export_switchable_openvino if backend == "openvino" else export_switchable_onnx
    check_output_target(options.output, options.force)  # fail before minutes of validation, not after
    resolved = resolve_model(options.model_id, options.adapters, base=options.base, revision=options.revision,
                             base_revision=options.base_revision, token=options.token)
    task = resolved.task
    task.check_export_mode("switchable", "switchable=True")
    names = [a.name for a in resolved.adapters]
    if not names:
        raise ConfigError('switchable=True needs at least one adapter: adapters=["NAME=PATH", ...]').in_cli_words(
            "--switchable needs at least one adapter: --adapter NAME=PATH (repeat for more)")
    if options.default_adapter is not None and options.default_adapter not in names:
        detail = f"{options.default_adapter!r} is not one of the adapters {names}"
        raise ConfigError(f"default_adapter={detail}").in_cli_words(f"--default-adapter {detail}")
    for adapter in resolved.adapters:
        check_switchable_config(adapter.config, str(adapter.folder / "adapter_config.json"))
    log(describe_base(resolved))
    for adapter in resolved.adapters:
        log(f"adapter {adapter.name!r}: {recorded_source(adapter.source)} {adapter.config.describe()}")

    prepared = prepare_export(options, resolved)
    models = attach_by_method(prepared.encoder, resolved.adapters, attach_adapters)
    peft_model = models[names[0]]
    targeted = set().union(*(peft_targeted_layers(m) for m in {id(m): m for m in models.values()}.values()))
    graph_encoder = prepared.load_encoder(options.trust_remote_code)
    branches = {name: peft_branch_factors(models[name], name) for name in names}
    slots = find_slots(graph_encoder, targeted, scale_kinds(list(branches.values())))
    copies = {n: peft_saved_params(models[n], n) for n in names}
    saved = find_saved(graph_encoder, {k: v.shape for c in copies.values() for k, v in c.items()}, slots)
    scaled = sum(bool(slot.scales) for slot in slots)
    log(f"switchable graph: LoRA branches at {len(slots)} layers" + (f", scale vectors at {scaled}" if scaled else ""))
    base = base_references(peft_model, prepared)
    refs, converted = {}, {}
    for adapter in resolved.adapters:
        refs[adapter.name] = adapter_references(models[adapter.name], adapter.name, prepared.make_pipeline,
                                                prepared.ref_tokenize, base, task)
        check_effect(refs[adapter.name], options.allow_noop_adapter)
        converted[adapter.name] = convert_adapter(models[adapter.name], adapter, slots, branches[adapter.name],
                                                  saved)
        log(f"adapter {adapter.name!r}: merged == eager PEFT within {refs[adapter.name].merged_vs_eager:.1e}; "
            f"changes {task.outputs[0].name} by up to {refs[adapter.name].effect:.3f}")

    with atomic_output_folder(options.output, force=options.force) as tmp:
        graph_pipeline = prepared.make_pipeline(graph_encoder)
        task_config = dict(graph_pipeline.task_config)  # the runtime config's task section (a reranker's activation)
        model_path = export_graph(graph_pipeline, slots, tmp, options.opset, saved=saved, task=task)
        save_tokenizer(prepared.tokenizer, tmp)
        main = task.outputs[0].name
        config = prepared.runtime_config(model_path.name, int(base[0].outputs[main].shape[-1]), backend)
        config.task_config = task_config
        config.lora_slots = [slot.to_dict() for slot in slots]
        config.saved_params = [param.to_dict() for param in saved]
        config.default_adapter = options.default_adapter
        for name, (arrays, summary) in converted.items():
            write_adapter_file(tmp / adapter_file(name, suffix), arrays)
            config.adapters[name] = _runtime_entry(name, summary, suffix)
        config.save(tmp, task.runtime_config_file)
        check_runtime_tokenizer(TextTokenizer(tmp, config), prepared.ref_tokenize, task.validation_texts,
                                task.text_pairs)
        candidates = {name: (tmp / adapter_file(name, suffix), refs[name]) for name in names}
        validation = validate_switchable_graph(tmp, config, base, candidates, {}, options.allow_noop_adapter, task)
        graph = "OpenVINO (f32 precision hint)" if backend == "openvino" else "ONNX Runtime"
        log(f"switchable graph on {graph} == base without adapter: "
            f"{validation['no_adapter_vs_base']['max_abs_diff'][main]:.1e}; every adapter == eager PEFT and == "
            "merged model within the task's tolerances")
        export_entry = _export_entry(backend, options, config, names, suffix)
        attention = AttentionShape.of(getattr(graph_encoder, "config", None))
        if backend != "openvino" and attention is not None:  # for merge_adapter's attention fusion
            export_entry["attention"] = {**attention.to_dict(),
                                         "bert_optimizer": family_of(graph_encoder).bert_optimizer}
        manifest = export_manifest(resolved, export_entry, config, {}, time.perf_counter() - started)
        manifest.update(_switchable_fields(options, resolved.base_id))
        manifest["adapters"] = [adapter_manifest_entry(n, tmp, converted[n][1], validation["adapters"][n], suffix)
                                for n in names]
        manifest["validation"] = {k: v for k, v in validation.items() if k != "adapters"}
        record_file_hashes(manifest, tmp)
        manifest["size_bytes"] = folder_size(tmp)
        write_json(tmp / MANIFEST_FILE, manifest)  # last: its presence marks a complete export
    log(f"wrote {options.output} ({manifest['size_bytes'] / 1e6:.1f} MB) in {manifest['export_seconds']:.1f} s")
    return ExportResult(Path(options.output), manifest, resolved)


def _recorded(model_id: str | None) -> str | None:
    """Local folders are recorded as absolute paths, so add-adapter finds them from any working directory; under
    the home directory as ``~/...`` (add-adapter expands it), so the manifest does not name the user's home."""
    if model_id and Path(model_id).expanduser().is_dir():
        path = Path(model_id).expanduser().resolve()
        try:
            return str(Path("~") / path.relative_to(Path.home().resolve()))
        except (ValueError, RuntimeError):  # outside the home directory, or no home directory
            return str(path)
    return model_id


def _switchable_fields(options: ExportOptions, base_id: str) -> dict[str, Any]:
    return {
        "merge_mode": MERGE_MODE,
        "default_adapter": options.default_adapter,
        # How add-adapter finds the same base and pipeline again.
        "source": {"model_id": _recorded(str(options.model_id)), "base": _recorded(options.base),
                   "revision": options.revision, "base_revision": options.base_revision, "base_id": _recorded(base_id)},
        "export_options": {"opset": options.opset, "max_seq_length": options.max_seq_length,
                           "pooling": options.pooling, "normalize": options.normalize},
    }
