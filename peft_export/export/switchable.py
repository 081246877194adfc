"""Switchable exports: one base graph with LoRA branches plus one adapter weight file per adapter, for ONNX Runtime
(``model.onnx`` + ``.onnx_adapter`` files) or OpenVINO (``openvino_model.xml`` + ``.safetensors`` files); and
``add-adapter`` / ``remove-adapter`` on an existing export, which never touch its graph.

Validation, before anything is declared done (at export and at add-adapter):

* every adapter through the switchable graph equals eager PEFT with that adapter active, and the PyTorch model
  with that adapter merged (normalised sentence embeddings within 1e-5);
* the graph with no adapter equals the base model (within 1e-6);
* adapters differ from the base and from each other (unless --allow-noop-adapter).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import AdapterNotFoundError, ConfigError, ValidationError
from ..runtime.backends import detect_backend
from ..runtime.config import MANIFEST_FILE, RuntimeConfig, read_manifest
from ..runtime.lora_layout import Slot, pack_factors
from ..runtime.tokenizer import TextTokenizer
from ..source.resolve import AdapterSource, load_adapter_source, parse_adapter_spec, resolve_model, sha256_file
from . import validate
from .artifact import atomic_output_folder, check_output_target, folder_size, write_json
from .families import family_of
from .pipeline import (NOOP_ADAPTER_THRESHOLD, ExportOptions, ExportResult, PreparedExport, _check_runtime_tokenizer,
                       _manifest, prepare_export)
from .switchable_adapters import (AdapterReferences, adapter_references, adapter_summary, check_switchable_config,
                                  check_targets_in_graph, max_output_difference, peft_lora_factors,
                                  validate_adapter_run)

logger = logging.getLogger(__name__)

MERGE_MODE = "switchable"
ADAPTERS_DIR = "adapters"
BASE_TOLERANCE = 1e-6  # "no adapter" vs the base model, normalised sentence embeddings
_RUNTIME_KEYS = ("r", "lora_alpha", "use_rslora", "target_modules", "modules", "ranks")


def _adapter_writer(backend: str) -> tuple[str, Callable[[Path, dict], None]]:
    """(file suffix, writer) of the adapter files the runtime ``backend`` reads."""
    if backend == "openvino":
        from ..runtime.openvino_adapters import ADAPTER_SUFFIX, write_adapter_file
    else:
        from ..runtime.onnxruntime_adapters import ADAPTER_SUFFIX, write_adapter_file
    return ADAPTER_SUFFIX, write_adapter_file


def _adapter_file(name: str, suffix: str) -> str:
    return f"{ADAPTERS_DIR}/{name}{suffix}"


def _graph_files(config: RuntimeConfig) -> list[str]:
    """The graph's files: ``model.onnx``, or an OpenVINO IR's ``.xml`` and ``.bin``."""
    if Path(config.model_file).suffix == ".xml":
        return [config.model_file, str(Path(config.model_file).with_suffix(".bin"))]
    return [config.model_file]


def _open_graph(folder: Path, config: RuntimeConfig):
    """The runtime backend the folder was exported for, with exact arithmetic (OpenVINO: the f32 hint)."""
    if detect_backend(config) == "openvino":
        from .openvino import compile_f32

        return compile_f32(folder / config.model_file)
    from ..runtime.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(folder / config.model_file, lora_inputs=True)


def _base_references(peft_model, prepared: PreparedExport) -> list[validate.ReferenceBatch]:
    with peft_model.disable_adapter():
        return validate.reference_outputs(prepared.make_pipeline(peft_model), prepared.ref_tokenize)


def _check_effect(refs: AdapterReferences, allow_noop: bool) -> None:
    if refs.effect < NOOP_ADAPTER_THRESHOLD and not allow_noop:
        raise ConfigError(
            f"Adapter {refs.name!r} changes the normalised embeddings by at most {refs.effect:.2g} (< "
            f"{NOOP_ADAPTER_THRESHOLD:g}): it does nothing (LoRA B still zero?). Pass --allow-noop-adapter to "
            "export it anyway."
        )


def _convert(peft_model, adapter: AdapterSource, slots: list[Slot]) -> tuple[dict, dict[str, Any]]:
    factors = peft_lora_factors(peft_model, adapter.name)
    return pack_factors(slots, factors), adapter_summary(adapter, factors)


def validate_switchable_graph(folder: Path, config: RuntimeConfig, base: list[validate.ReferenceBatch],
                              candidates: dict[str, tuple[Path, AdapterReferences]], existing: dict[str, Path],
                              allow_duplicates: bool) -> dict[str, Any]:
    """Run the graph in ``folder`` without an adapter, with each candidate adapter file (checked against its
    references), and with each existing adapter file (for the pairwise difference); raise on any failure."""
    backend = _open_graph(folder, config)
    report = validate.compare_with_reference(
        base, backend.run, "The switchable graph without an adapter (vs the base model)",
        tolerances={"sentence_embedding": BASE_TOLERANCE, "token_embeddings": validate.TOKEN_TOLERANCE},
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
            diff = max_output_difference(outputs[a], outputs[b])
            pairs[f"{a} vs {b}"] = diff
            if diff < NOOP_ADAPTER_THRESHOLD and not allow_duplicates:
                raise ValidationError(
                    f"Adapters {a!r} and {b!r} give the same embeddings (max difference {diff:.2g} < "
                    f"{NOOP_ADAPTER_THRESHOLD:g}); is one a copy of the other? Pass --allow-noop-adapter to keep both."
                )
    return {"no_adapter_vs_base": report.to_dict(), "adapters": per_adapter, "adapter_pair_max_abs_diff": pairs}


def _runtime_entry(name: str, summary: dict[str, Any], suffix: str) -> dict[str, Any]:
    return {"file": _adapter_file(name, suffix), **{k: summary[k] for k in _RUNTIME_KEYS if k in summary}}


def _manifest_entry(name: str, folder: Path, summary: dict[str, Any], validation: dict[str, Any],
                    suffix: str) -> dict[str, Any]:
    file = _adapter_file(name, suffix)
    return {"name": name, "file": file, "file_sha256": sha256_file(folder / file), **summary,
            "validation": validation}


def _export_entry(backend: str, options: ExportOptions, config: RuntimeConfig, names: list[str],
                  suffix: str) -> dict[str, Any]:
    files = _graph_files(config) + [_adapter_file(n, suffix) for n in names]
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
    from peft.tuners.lora import LoraLayer

    from .merge import attach_adapters
    from .ort_fusion import AttentionShape
    from .switchable_graph import export_switchable_onnx, export_switchable_openvino, find_slots

    started = time.perf_counter()
    if options.quantize:
        raise ConfigError("--quantize is not supported with --switchable: export the adapters in float32")
    if options.dtype != "fp32":
        raise ConfigError("--dtype fp16 is not supported with --switchable: export the adapters in float32")
    suffix, write_adapter_file = _adapter_writer(backend)
    export_graph = export_switchable_openvino if backend == "openvino" else export_switchable_onnx
    check_output_target(options.output, options.force)  # fail before minutes of validation, not after
    resolved = resolve_model(options.model_id, options.adapters, base=options.base, revision=options.revision,
                             base_revision=options.base_revision, token=options.token)
    names = [a.name for a in resolved.adapters]
    if not names:
        raise ConfigError("--switchable needs at least one adapter: --adapter NAME=PATH (repeat for more)")
    if options.default_adapter is not None and options.default_adapter not in names:
        raise ConfigError(f"--default-adapter {options.default_adapter!r} is not one of the adapters {names}")
    for adapter in resolved.adapters:
        check_switchable_config(adapter.config, str(adapter.folder / "adapter_config.json"))
    log(f"base: {resolved.base_id} ({resolved.encoder_folder})")
    for adapter in resolved.adapters:
        log(f"adapter {adapter.name!r}: {adapter.source} r={adapter.config.r} alpha={adapter.config.lora_alpha} "
            f"targets={adapter.config.target_modules}")

    prepared = prepare_export(options, resolved)
    peft_model = attach_adapters(prepared.encoder, resolved.adapters)
    targeted = {n for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    graph_encoder = prepared.load_encoder(options.trust_remote_code)
    slots = find_slots(graph_encoder, targeted)
    log(f"switchable graph: LoRA branches at {len(slots)} layers")
    base = _base_references(peft_model, prepared)
    refs, converted = {}, {}
    for adapter in resolved.adapters:
        refs[adapter.name] = adapter_references(peft_model, adapter.name, prepared.make_pipeline,
                                                prepared.ref_tokenize, base)
        _check_effect(refs[adapter.name], options.allow_noop_adapter)
        converted[adapter.name] = _convert(peft_model, adapter, slots)
        log(f"adapter {adapter.name!r}: merged == eager PEFT within {refs[adapter.name].merged_vs_eager:.1e}; "
            f"changes embeddings by up to {refs[adapter.name].effect:.3f}")

    with atomic_output_folder(options.output, force=options.force) as tmp:
        model_path = export_graph(prepared.make_pipeline(graph_encoder), slots, tmp, options.opset)
        prepared.tokenizer.save_pretrained(str(tmp))
        config = prepared.runtime_config(model_path.name, int(base[0].sentence_embedding.shape[-1]), backend)
        config.lora_slots = [slot.to_dict() for slot in slots]
        config.default_adapter = options.default_adapter
        for name, (arrays, summary) in converted.items():
            write_adapter_file(tmp / _adapter_file(name, suffix), arrays)
            config.adapters[name] = _runtime_entry(name, summary, suffix)
        config.save(tmp)
        _check_runtime_tokenizer(TextTokenizer(tmp, config), prepared.ref_tokenize, validate.VALIDATION_TEXTS)
        candidates = {name: (tmp / _adapter_file(name, suffix), refs[name]) for name in names}
        validation = validate_switchable_graph(tmp, config, base, candidates, {}, options.allow_noop_adapter)
        graph = "OpenVINO (f32 precision hint)" if backend == "openvino" else "ONNX Runtime"
        log(f"switchable graph on {graph} == base without adapter: "
            f"{validation['no_adapter_vs_base']['max_abs_diff']['sentence_embedding']:.1e}; every adapter == eager "
            "PEFT and == merged model within 1e-5")
        export_entry = _export_entry(backend, options, config, names, suffix)
        attention = AttentionShape.of(getattr(graph_encoder, "config", None))
        if backend != "openvino" and attention is not None and family_of(graph_encoder).bert_attention_fusion:
            export_entry["attention"] = attention.to_dict()  # for merge_adapter's attention fusion
        manifest = _manifest(resolved, export_entry, config, {}, time.perf_counter() - started)
        manifest.update(_switchable_fields(options, resolved.base_id))
        manifest["adapters"] = [_manifest_entry(n, tmp, converted[n][1], validation["adapters"][n], suffix)
                                for n in names]
        manifest["validation"] = {k: v for k, v in validation.items() if k != "adapters"}
        manifest["size_bytes"] = folder_size(tmp)
        write_json(tmp / MANIFEST_FILE, manifest)  # last: its presence marks a complete export
    log(f"wrote {options.output} ({manifest['size_bytes'] / 1e6:.1f} MB) in {manifest['export_seconds']:.1f} s")
    return ExportResult(Path(options.output), manifest, resolved)


def _recorded(model_id: str | None) -> str | None:
    """Local folders are recorded as absolute paths, so add-adapter finds them from any working directory."""
    if model_id and Path(model_id).expanduser().is_dir():
        return str(Path(model_id).expanduser().resolve())
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


@contextlib.contextmanager
def _locked(folder: Path):
    """One add/remove at a time per export folder (an flock on the folder itself, so no file is created)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; callers must not run two changes at once
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_switchable(folder: Path) -> tuple[RuntimeConfig, dict[str, Any]]:
    if not folder.is_dir():
        raise ConfigError(f"Export folder not found: {folder}")
    config = RuntimeConfig.load(folder)
    manifest = read_manifest(folder)
    if manifest.get("merge_mode") != MERGE_MODE or not config.lora_slots:
        raise ConfigError(
            f"{folder} is a {manifest.get('merge_mode', 'merged')!r} export; adapters can only be added to or "
            "removed from a switchable export (peft-export merge-onnx BASE --adapter NAME=PATH --switchable)"
        )
    return config, manifest


def _prepare_base(manifest: dict[str, Any], folder: Path, base: str | None, token, trust_remote_code: bool,
                  config: RuntimeConfig) -> PreparedExport:
    """The base model and pipeline the export was made from (``base`` overrides where the base is found), checked
    against the export's runtime config."""
    source, saved = manifest.get("source") or {}, manifest.get("export_options") or {}
    model_id = source.get("model_id") or manifest["base"]["id"]
    if model_id != source.get("base_id", model_id):  # an adapter-only folder whose base came from --base or its config
        resolved = resolve_model(model_id, base=base or source.get("base"), revision=source.get("revision"),
                                 base_revision=source.get("base_revision"), token=token)
    else:
        model_id = base or model_id
        resolved = resolve_model(model_id, revision=None if base else source.get("revision"), token=token)
    options = ExportOptions(model_id=model_id, output=folder, opset=saved.get("opset", 17),
                            max_seq_length=saved.get("max_seq_length"), pooling=saved.get("pooling"),
                            normalize=saved.get("normalize"), trust_remote_code=trust_remote_code)
    prepared = prepare_export(options, resolved)
    fresh = prepared.runtime_config(config.model_file, config.dimension).to_dict()
    for key in ("input_names", "max_seq_length", "pooling_modes", "normalize", "has_dense", "do_lower_case"):
        if fresh[key] != getattr(config, key):
            raise ConfigError(
                f"The base model {resolved.base_id!r} does not match this export: {key} is {fresh[key]!r} there and "
                f"{getattr(config, key)!r} in the export. Pass --base with the model the export was made from."
            )
    return prepared


def add_adapter(output: str | Path, spec: str, *, base: str | None = None, force: bool = False,
                allow_noop_adapter: bool = False, trust_remote_code: bool = False, token=None,
                log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Convert and validate a PEFT adapter for an existing switchable export, then add its weight file.

    The graph is never modified. Every check runs before anything is written to the folder; a rejected adapter
    leaves it unchanged. Returns the adapter's manifest entry.
    """
    from .merge import attach_adapters

    folder = Path(output)
    name, target = parse_adapter_spec(spec)
    if name is None:
        raise ConfigError(f"Name the adapter: NAME={spec}")
    _load_switchable(folder)
    with _locked(folder):
        config, manifest = _load_switchable(folder)
        if name in config.adapters and not force:
            raise ConfigError(f"{folder} already has an adapter named {name!r}; pass --force to replace it, or "
                              "remove it first with `peft-export remove-adapter`")
        adapter = load_adapter_source(target, name=name, token=token)
        check_switchable_config(adapter.config, str(adapter.folder / "adapter_config.json"))
        slots = [Slot.from_dict(s) for s in config.lora_slots]
        check_targets_in_graph(adapter, slots)
        suffix, write_adapter_file = _adapter_writer(detect_backend(config))
        recorded = manifest["base"]["id"]
        if adapter.config.base_model_name_or_path and Path(adapter.config.base_model_name_or_path).name != \
                Path(str(recorded)).name:
            log(f"note: adapter {name!r} names base {adapter.config.base_model_name_or_path!r}; this export's base "
                f"is {recorded!r}. Outputs are checked against the export's base below.")
        prepared = _prepare_base(manifest, folder, base, token, trust_remote_code, config)
        peft_model = attach_adapters(prepared.encoder, [adapter])
        base_refs = _base_references(peft_model, prepared)
        refs = adapter_references(peft_model, name, prepared.make_pipeline, prepared.ref_tokenize, base_refs)
        _check_effect(refs, allow_noop_adapter)
        arrays, summary = _convert(peft_model, adapter, slots)

        final = folder / _adapter_file(name, suffix)
        candidate = final.with_name(f".{final.name}.{os.getpid()}.candidate")
        existing = {n: folder / _adapter_file(n, suffix) for n in config.adapters if n != name}
        try:
            write_adapter_file(candidate, arrays)
            try:
                validation = validate_switchable_graph(folder, config, base_refs, {name: (candidate, refs)},
                                                       existing, allow_noop_adapter)
            except ValidationError as err:
                if "without an adapter" in str(err):
                    raise ValidationError(
                        f"{err}. The base model used for validation is not the one this export was made from; pass "
                        "--base with that model."
                    ) from err
                raise
            os.replace(candidate, final)  # commit order: weight file, runtime config, manifest
        finally:
            candidate.unlink(missing_ok=True)
        config.adapters[name] = _runtime_entry(name, summary, suffix)
        config.save(folder)
        entry = _manifest_entry(name, folder, summary, validation["adapters"][name], suffix)
        manifest["adapters"] = [a for a in manifest.get("adapters", []) if a["name"] != name] + [entry]
        manifest["export"]["files"] = _graph_files(config) + [_adapter_file(n, suffix) for n in config.adapters]
        manifest["validation"].setdefault("adapter_pair_max_abs_diff", {}).update(
            validation["adapter_pair_max_abs_diff"])
        manifest["size_bytes"] = folder_size(folder)
        write_json(folder / MANIFEST_FILE, manifest)
    log(f"added adapter {name!r} to {folder} ({final.stat().st_size / 1e6:.2f} MB): == eager PEFT within "
        f"{validation['adapters'][name]['vs_eager_peft']['max_abs_diff']['sentence_embedding']:.1e}")
    return entry


def remove_adapter(output: str | Path, name: str, log: Callable[[str], None] = logger.info) -> None:
    """Remove an adapter's weight file and its entries; the graph is never modified."""
    folder = Path(output)
    _load_switchable(folder)
    with _locked(folder):
        config, manifest = _load_switchable(folder)
        if name not in config.adapters:
            raise AdapterNotFoundError(f"{folder} has no adapter named {name!r}; it has {sorted(config.adapters)}")
        del config.adapters[name]
        if config.default_adapter == name:
            config.default_adapter = None
            log(f"{name!r} was the default adapter; the export now loads with no adapter active")
        suffix, _ = _adapter_writer(detect_backend(config))
        config.save(folder)  # commit point: the runtime no longer sees the adapter
        (folder / _adapter_file(name, suffix)).unlink(missing_ok=True)
        manifest["adapters"] = [a for a in manifest.get("adapters", []) if a["name"] != name]
        manifest["default_adapter"] = config.default_adapter
        manifest["export"]["files"] = _graph_files(config) + [_adapter_file(n, suffix) for n in config.adapters]
        pairs = manifest.get("validation", {}).get("adapter_pair_max_abs_diff", {})
        for key in [k for k in pairs if name in k.split(" vs ")]:
            del pairs[key]
        manifest["size_bytes"] = folder_size(folder)
        write_json(folder / MANIFEST_FILE, manifest)
    log(f"removed adapter {name!r} from {folder}")
