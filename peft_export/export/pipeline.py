"""Run the export stages in order: resolve -> load + merge -> reference -> write graph + validate -> manifest.

Every format (ONNX, OpenVINO) shares all stages but one: a :class:`GraphFormat` writes its graph into the
temporary export folder and validates what it wrote against the PyTorch reference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from ..errors import ConfigError
from ..runtime.atomic_file import write_json
from ..runtime.config import MANIFEST_FILE, RuntimeConfig
from ..runtime.tokenizer import TextTokenizer
from ..source.resolve import ResolvedModel, describe_base, recorded_source, resolve_model
from ..source.st_config import POOLING_MODES
from . import dependencies, validate  # noqa: F401 (dependencies first: without torch, an error naming the extra)
from .manifest import export_manifest, record_file_hashes
from .output_folder import atomic_output_folder, check_output_target, folder_size
from .tokenizer_files import check_runtime_tokenizer, save_tokenizer
from .families import family_of
from .gate import QualityGate
from ..tasks import Task, load_reference

logger = logging.getLogger(__name__)

# An adapter whose effect on normalised embeddings stays under this is reported as doing nothing.
NOOP_ADAPTER_THRESHOLD = 1e-4


@dataclass
class ExportOptions:
    model_id: str
    output: str | Path
    adapters: list[str] = field(default_factory=list)
    base: str | None = None
    revision: str | None = None
    base_revision: str | None = None
    token: str | bool | None = None
    force: bool = False
    opset: int = 17
    max_seq_length: int | None = None
    pooling: str | None = None  # override for plain encoders without a Pooling config
    normalize: bool | None = None
    trust_remote_code: bool = False
    allow_noop_adapter: bool = False
    quantize: str | None = None  # "int8" (dynamic) or "int8-static"; see export/quantize.py
    dtype: str = "fp32"  # "fp16": an fp16 graph for GPUs, gated against fp32; see export/fp16.py
    fuse_attention: bool = True  # ONNX fp32/int8: ORT's attention fusion, validated; see runtime/onnxruntime_fusion.py
    gate: QualityGate = field(default_factory=QualityGate)
    gate_data: str | None = None  # JSON lines of {"query", "passage"}; default: the demo held-out pairs
    calibration_data: str | None = None  # text file, one sentence per line; default: demo training text
    switchable: bool = False  # keep adapters separate: one base graph + one weight file per adapter
    default_adapter: str | None = None  # switchable: the adapter active when the export is loaded
    stack_adapters: bool = False  # merged: every adapter active at once (PEFT's set_adapter([a, b])), merged together


@dataclass
class MergedModel:
    """What the shared stages hand to a graph format: the merged fp32 pipeline and its reference outputs."""

    resolved: ResolvedModel
    pipeline: Any  # the task's torch module (EmbeddingPipeline), adapter merged, eval mode
    tokenizer: Any  # transformers fast tokenizer, model_max_length set to max_seq_length
    input_names: list[str]
    reference_tokenize: Callable[[list[str]], dict[str, np.ndarray]]
    references: list[validate.ReferenceBatch]  # PyTorch (unmerged PEFT) outputs on the validation shapes
    max_seq_length: int
    dense_layers: int
    validation: dict[str, Any]  # measured parity so far; the format adds its own entries
    started: float
    max_positions: int | None = None  # the encoder's positions: max_seq_length's limit, recorded for the runtime
    encoder_config: Any = None  # the transformers config (attention shape for fusion), kept after release()
    task_config: dict[str, Any] = field(default_factory=dict)  # the torch module's runtime settings (RuntimeConfig)
    stacked_adapters: list[str] = field(default_factory=list)  # stack_adapters: the names merged together

    def release(self) -> None:
        """Drop the torch pipeline once its graph is written: the stages after it compare with the stored
        references, and a large model's weights would otherwise stay in memory beside the runtime's copy."""
        import gc

        self.pipeline = None
        gc.collect()


class GraphFormat(Protocol):
    """The one export step that differs per format."""

    name: str  # manifest["export"]["format"]
    backend: str  # embedding_config.json "backend": the runtime that loads the folder

    def write(self, merged: MergedModel, folder: Path, log: Callable[[str], None]) -> Path:
        """Write the graph into ``folder``; return the model file the runtime loads."""

    def validate(self, merged: MergedModel, model_path: Path, config: RuntimeConfig,
                 log: Callable[[str], None]) -> dict[str, Any]:
        """Check the written graph against ``merged.references``; raise ValidationError or return manifest entries.

        May replace the graph (int8 quantization) and update ``config`` accordingly."""

    def manifest_entry(self, config: RuntimeConfig) -> dict[str, Any]:
        """The manifest's ``export`` section."""


@dataclass
class ExportResult:
    path: Path
    manifest: dict[str, Any]
    resolved: ResolvedModel


def noop_adapter_error(name: str, effect: float, what: str = "normalised embeddings") -> ConfigError:
    """An adapter that leaves ``what`` (the task's main output) as the base makes it: refused unless
    allow_noop_adapter."""
    found = (f"Adapter {name!r} changes the {what} by at most {effect:.2g} (< "
             f"{NOOP_ADAPTER_THRESHOLD:g}): it does nothing (LoRA B still zero?). Pass")
    return ConfigError(f"{found} allow_noop_adapter=True to export it anyway.").in_cli_words(
        f"{found} --allow-noop-adapter to export it anyway.")


def position_limit(encoder) -> int:
    """Tokens the encoder has positions for (RoBERTa-like models lose two to the padding index's offset)."""
    cfg = encoder.config
    limit = getattr(cfg, "max_position_embeddings", None) or 512
    limit -= family_of(encoder).position_offset  # e.g. RoBERTa-likes: positions start after the padding index
    return int(limit)


def _max_seq_length(options: ExportOptions, resolved: ResolvedModel, encoder, tokenizer) -> int:
    limit = position_limit(encoder)
    requested = options.max_seq_length or resolved.pipeline.max_seq_length
    if requested is None:
        tok_max = getattr(tokenizer, "model_max_length", None)
        requested = tok_max if isinstance(tok_max, int) and tok_max < 1_000_000 else limit
    if requested < 1:
        raise ConfigError(f"max_seq_length must be positive, found {requested}")
    if options.max_seq_length and options.max_seq_length > limit:
        detail = f"{options.max_seq_length} exceeds the model's {limit} positions"
        raise ConfigError(f"max_seq_length={detail}").in_cli_words(f"--max-seq-length {detail}")
    return min(int(requested), limit)


def _apply_overrides(options: ExportOptions, resolved: ResolvedModel) -> None:
    pipeline = resolved.pipeline
    if options.pooling:
        modes = options.pooling.split(",")
        for mode in modes:
            if mode not in POOLING_MODES:
                detail = f"{mode!r} is not one of {', '.join(POOLING_MODES)}"
                raise ConfigError(f"pooling={detail} (several: comma-separated)").in_cli_words(
                    f"--pooling {detail}")
        pipeline.pooling.modes = modes
    if options.normalize is not None:
        pipeline.normalize = options.normalize


def _load_tokenizer(resolved: ResolvedModel, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from .quiet import quiet_loading_bars

    quiet_loading_bars()

    tokenizer = AutoTokenizer.from_pretrained(str(resolved.tokenizer_folder), trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"{resolved.tokenizer_folder}: no fast (Rust) tokenizer is available; the torch-free runtime needs "
            "tokenizer.json. Convert it with transformers' AutoTokenizer(use_fast=True) and save it."
        )
    return tokenizer


def _reference_tokenize(tokenizer, input_names: list[str], max_len: int, text_pairs: bool = False,
                        first_prompt: str = "") -> Callable[..., dict]:
    """The reference tokenization (transformers, as sentence-transformers calls it): of texts, or where the task
    takes ``text_pairs``, of (first, second) pairs tokenized together, the longest side truncated first, with
    ``first_prompt`` before each first text (a CrossEncoder's default prompt goes before the query)."""

    def tokenize(texts: list, max_length: int | None = None) -> dict[str, np.ndarray]:
        limit = min(max_length or max_len, max_len)
        sides = ([first_prompt + p[0] for p in texts], [p[1] for p in texts]) if text_pairs else (texts,)
        enc = tokenizer(*sides, padding=True, truncation=True, max_length=limit, return_tensors="np")
        return {name: enc[name].astype(np.int64) for name in input_names}

    return tokenize


def check_stack(options: ExportOptions, adapters: list) -> None:
    """A merged export takes one adapter, or several with stack_adapters (all active at once, merged together);
    anything else is ambiguous and refused with both ways out."""
    names = ", ".join(a.name for a in adapters)
    if options.stack_adapters and len(adapters) < 2:
        found = f"stacks two or more adapters, {len(adapters)} given{f' ({names})' if names else ''}; pass"
        raise ConfigError(f"stack_adapters=True {found} several adapters or drop stack_adapters").in_cli_words(
            f"--stack-adapters {found} --adapter NAME=PATH for each, or drop --stack-adapters")
    if options.stack_adapters and len({a.config.peft_type for a in adapters}) > 1:
        types = ", ".join(f"{a.name}: {a.config.peft_type}" for a in adapters)
        raise ConfigError(f"Stacked adapters must share one PEFT method ({types}): PEFT runs a stack of one "
                          "method's adapters in a PeftModel (mixed methods need its PeftMixedModel, not supported)")
    if len(adapters) > 1 and not options.stack_adapters:
        given = (f"A merged export takes one adapter, {len(adapters)} were given ({names}); export each separately, "
                 "pass")
        keep = "to keep them as switchable adapters over one base graph, or"
        stack = "to merge them all into one model (PEFT with every adapter active at once)"
        raise ConfigError(f"{given} switchable=True {keep} stack_adapters=True {stack}").in_cli_words(
            f"{given} --switchable {keep} --stack-adapters {stack}")


def run_export(options: ExportOptions, graph_format: GraphFormat, log: Callable[[str], None] = logger.info
               ) -> ExportResult:
    """The stages every format shares around the one step that differs: write the graph and validate it."""
    check_output_target(options.output, options.force)  # fail before minutes of merging, not after
    merged = merge_and_reference(options, log)
    return write_export(merged, options, graph_format, log, release=True)


@dataclass
class PreparedExport:
    """What every export mode loads first: the resolved model, its tokenizer and fp32 encoder, the pipeline
    modules after the encoder, and the reference tokenization."""

    resolved: ResolvedModel
    tokenizer: Any
    encoder: Any
    max_len: int
    uses_token_type_ids: bool
    dense: list
    input_names: list[str]
    ref_tokenize: Callable[[list[str]], dict[str, np.ndarray]]

    @property
    def task(self) -> Task:
        return self.resolved.task

    def make_pipeline(self, module):
        """The task's torch module around the encoder ``module`` (a PEFT model or a plain encoder), eval mode."""
        return load_reference(self.task.torch_module)(module, self)

    def load_encoder(self, trust_remote_code: bool = False):
        """Another fresh copy of the base encoder."""
        from .merge import load_base_encoder

        return load_base_encoder(self.resolved.encoder_folder, trust_remote_code, self.task)

    def runtime_config(self, model_file: str, sentence_dim: int, backend: str = "onnxruntime") -> RuntimeConfig:
        return runtime_config(self.resolved, self.tokenizer, self.input_names, self.max_len, len(self.dense),
                              sentence_dim, model_file, backend, max_positions=position_limit(self.encoder))


def prepare_export(options: ExportOptions, resolved: ResolvedModel) -> PreparedExport:
    """Load tokenizer, encoder (fp32) and Dense modules for ``resolved``, with ``options``' overrides applied."""
    import torch

    from .embedding_module import load_dense
    from .merge import load_base_encoder, uses_token_type_ids

    _apply_overrides(options, resolved)
    torch.manual_seed(0)
    tokenizer = _load_tokenizer(resolved, options.trust_remote_code)
    encoder = load_base_encoder(resolved.encoder_folder, options.trust_remote_code, resolved.task)
    max_len = _max_seq_length(options, resolved, encoder, tokenizer)
    tokenizer.model_max_length = max_len
    with_type_ids = uses_token_type_ids(encoder, tokenizer)
    dense = [load_dense(resolved.pipeline_folder, d) for d in resolved.pipeline.dense]
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_type_ids else [])
    if resolved.task.text_pairs and getattr(tokenizer, "chat_template", None):
        # Pairs rendered through the chat template, as sentence-transformers' CrossEncoder renders them.
        from .pair_template import chat_template_tokenizer, default_prompt

        ref_tokenize = chat_template_tokenizer(tokenizer, names, max_len, default_prompt(resolved.pipeline))
    elif resolved.task.text_pairs:
        from .pair_template import default_prompt

        ref_tokenize = _reference_tokenize(tokenizer, names, max_len, True, default_prompt(resolved.pipeline) or "")
    else:
        ref_tokenize = _reference_tokenize(tokenizer, names, max_len)
    return PreparedExport(resolved, tokenizer, encoder, max_len, with_type_ids, dense, names, ref_tokenize)


def merge_and_reference(options: ExportOptions, log: Callable[[str], None] = logger.info) -> MergedModel:
    """Resolve, load in fp32, merge the adapter with PEFT, and record the PyTorch reference outputs."""
    from .merge import attach_adapters, merge_adapter, nonfinite_hint

    started = time.perf_counter()
    resolved = resolve_model(options.model_id, options.adapters, base=options.base, revision=options.revision,
                             base_revision=options.base_revision, token=options.token)
    if options.default_adapter is not None:
        raise ConfigError("default_adapter only applies to switchable exports (switchable=True)").in_cli_words(
            "--default-adapter only applies to switchable exports (--switchable)")
    check_stack(options, resolved.adapters)
    if options.quantize:
        resolved.task.check_export_mode("lossy", f"quantize={options.quantize!r}")
    if options.dtype != "fp32":
        resolved.task.check_export_mode("lossy", f"dtype={options.dtype!r}")
    log(describe_base(resolved))
    for adapter in resolved.adapters:
        log(f"adapter {adapter.name!r}: {recorded_source(adapter.source)} {adapter.config.describe()}")
    if not resolved.adapters:
        log("adapter: none; the base model is exported as it is (no LoRA adapter was given or found in the model)")

    prepared = prepare_export(options, resolved)
    encoder, make_pipeline, ref_tokenize = prepared.encoder, prepared.make_pipeline, prepared.ref_tokenize
    tokenizer, names, max_len, dense = prepared.tokenizer, prepared.input_names, prepared.max_len, prepared.dense
    task = prepared.task
    parity: dict[str, Any] = {}
    if resolved.adapters:
        adapter = resolved.adapters[0]
        stack = [a.name for a in resolved.adapters]
        peft_model = attach_adapters(encoder, resolved.adapters)
        if options.stack_adapters:
            peft_model.base_model.set_adapter(stack)  # every adapter active at once, as PEFT runs a stack
            log(f"stacked adapters {', '.join(map(repr, stack))}: merged together, all active")
        references = validate.reference_outputs(make_pipeline(peft_model), ref_tokenize, task=task)
        validate.check_finite_outputs(references, f"Adapter {adapter.name!r}", nonfinite_hint(adapter))
        with peft_model.disable_adapter():
            effect = validate.max_main_difference(references, validate.torch_runner(make_pipeline(peft_model), task),
                                                  task)
        parity["adapter_vs_base_max_abs_diff"] = effect
        if effect < NOOP_ADAPTER_THRESHOLD and not options.allow_noop_adapter:
            raise noop_adapter_error(" + ".join(stack) if options.stack_adapters else adapter.name, effect,
                                     task.outputs[0].description or task.outputs[0].name)
        merged = merge_adapter(peft_model, stack if options.stack_adapters else adapter.name)
        final = make_pipeline(merged)
        merge_report = validate.compare_with_reference(references, validate.torch_runner(final, task),
                                                       "The merged model", task=task)
        parity["merged_vs_unmerged"] = merge_report.max_diff
        main = task.outputs[0].name
        log(f"merged == unmerged PEFT: max diff {merge_report.max_diff[main]:.2e}; "
            f"adapter changes {main} by up to {effect:.3f}")
    else:
        final = make_pipeline(encoder)
        references = validate.reference_outputs(final, ref_tokenize, task=task)
    return MergedModel(resolved=resolved, pipeline=final, tokenizer=tokenizer, input_names=names,
                       reference_tokenize=ref_tokenize,
                       references=references, max_seq_length=max_len, dense_layers=len(dense), validation=parity,
                       started=started, max_positions=position_limit(encoder),
                       encoder_config=getattr(final.encoder, "config", None), task_config=dict(final.task_config),
                       stacked_adapters=[a.name for a in resolved.adapters] if options.stack_adapters else [])


def write_export(merged: MergedModel, options: ExportOptions, graph_format: GraphFormat,
                 log: Callable[[str], None] = logger.info, release: bool = False) -> ExportResult:
    """Write graph, tokenizer and runtime config into a temporary folder, validate, write the manifest, rename.

    ``merged`` is not modified, so one merge can be written in several formats, unless ``release``: then its
    torch pipeline is dropped as soon as the graph is written (see MergedModel.release).
    """
    resolved = merged.resolved
    with atomic_output_folder(options.output, force=options.force) as tmp:
        model_path = graph_format.write(merged, tmp, log)
        if release:
            merged.release()
        save_tokenizer(merged.tokenizer, tmp)
        task = resolved.task
        sentence_dim = int(merged.references[0].outputs[task.outputs[0].name].shape[-1])
        config = runtime_config(resolved, merged.tokenizer, merged.input_names, merged.max_seq_length,
                                merged.dense_layers, sentence_dim, model_path.name, graph_format.backend,
                                max_positions=merged.max_positions, task_config=merged.task_config)
        config.save(tmp, task.runtime_config_file)
        runtime_tok = TextTokenizer(tmp, config)
        check_runtime_tokenizer(runtime_tok, merged.reference_tokenize, task.validation_texts, task.text_pairs)
        validation = {**merged.validation, **graph_format.validate(merged, model_path, config, log)}
        manifest = export_manifest(resolved, graph_format.manifest_entry(config), config, validation,
                             time.perf_counter() - merged.started)
        if merged.stacked_adapters:  # every adapter listed was active at once and merged together
            manifest["stacked_adapters"] = list(merged.stacked_adapters)
        record_file_hashes(manifest, tmp)
        manifest["size_bytes"] = folder_size(tmp)
        write_json(tmp / MANIFEST_FILE, manifest)  # last: its presence marks a complete export
    log(f"wrote {options.output} ({manifest['size_bytes'] / 1e6:.1f} MB) in {manifest['export_seconds']:.1f} s")
    return ExportResult(Path(options.output), manifest, resolved)


def runtime_config(resolved: ResolvedModel, tokenizer, input_names: list[str], max_seq_length: int, dense_layers: int,
                   sentence_dim: int, model_file: str, backend: str, max_positions: int | None = None,
                   task_config: dict[str, Any] | None = None) -> RuntimeConfig:
    """The runtime config (the task's file: embedding_config.json, reranker_config.json) for an export of
    ``resolved``'s pipeline; ``sentence_dim`` is the width of the task's main output."""
    pipeline = resolved.pipeline
    return RuntimeConfig(
        backend=backend,
        model_file=model_file,
        input_names=list(input_names),
        dimension=sentence_dim,
        max_seq_length=max_seq_length,
        do_lower_case=pipeline.do_lower_case,
        pad_token_id=int(tokenizer.pad_token_id or 0),
        pooling_modes=list(pipeline.pooling.modes),
        include_prompt=pipeline.pooling.include_prompt,
        has_dense=bool(dense_layers),
        normalize=pipeline.normalize,
        prompts=pipeline.prompts,
        default_prompt_name=pipeline.default_prompt_name,
        similarity_fn_name=pipeline.similarity_fn_name,
        max_positions=max_positions,
        output_names=resolved.task.output_names,
        task_config=dict(task_config or {}),
    )
