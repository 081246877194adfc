"""Trace an EmbeddingPipeline to ONNX with torch.onnx, dynamic batch and sequence axes; the ONNX export format."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .families import family_for, tracing_pipeline
from .fp16 import DTYPES
from .embedding_module import EmbeddingPipeline
from ..tasks import EMBEDDING, Task

DEFAULT_OPSET = 17
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"
OUTPUT_NAMES = list(EMBEDDING.output_names)  # the embedding task's; a graph's are its task's (Task.outputs)
TRACE_ONNX = "Tracing to ONNX (torch.onnx.export)"
# Weights at least this large go to one external data file (protobuf caps a file at 2 GiB); tests lower it.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3
# ONNX Runtime's BERT optimizer holds several copies of the weights (its shape inference serializes the model, and
# one protobuf caps at 2 GiB): 16 GB resident for a 2.4 GB graph when it was stopped. External-data graphs larger
# than this keep the traced attention in families that run that optimizer; families fused by the attention rewrite
# alone (rotary decoders, ModernBERT) are rewritten as a graph without its weights, whatever their size.
FUSION_WEIGHT_LIMIT = 2 * 1024**3
_TRACE_FOLDER = ".torch-onnx"  # where torch.onnx writes a large graph's per-tensor files, removed after packing
STATIC_KEEPS_TRACED = ("int8-static: ONNX Runtime's static (QDQ) quantizer has no form of the fused Attention "
                       "operator, so the traced query/key/value MatMuls are quantized instead")


def input_names(pipeline: EmbeddingPipeline) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if pipeline.uses_token_type_ids:
        names.append("token_type_ids")
    return names


def dummy_inputs(pipeline: EmbeddingPipeline, batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, ...]:
    """Tracing inputs; validation deliberately uses other shapes."""
    vocab = int(getattr(pipeline.encoder.config, "vocab_size", 1000))
    input_ids = torch.randint(5, min(vocab, 1000), (batch, seq), dtype=torch.int64)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    attention_mask[1:, seq // 2 :] = 0  # a padded row, so masking is traced
    tensors = [input_ids, attention_mask]
    if pipeline.uses_token_type_ids:
        tensors.append(torch.zeros(batch, seq, dtype=torch.int64))
    return tuple(tensors)


def export_onnx(pipeline: EmbeddingPipeline, folder: Path, opset: int = DEFAULT_OPSET, task: Task = EMBEDDING
                ) -> Path:
    """Write ``folder/model.onnx``, plus ``model.onnx_data`` when the weights reach EXTERNAL_DATA_THRESHOLD.

    A large graph is traced into a scratch folder (torch.onnx writes one file per tensor there) and packed
    into the two files by streaming (export/external_data.py); the scratch folder is then removed, so the export
    folder holds only the files its graph references."""
    path = folder / MODEL_FILE
    size = sum(p.numel() * p.element_size() for p in pipeline.parameters())
    if size < EXTERNAL_DATA_THRESHOLD:
        _trace(pipeline, path, opset, task)
        return path
    from .external_data import pack_external_data

    scratch = folder / _TRACE_FOLDER
    scratch.mkdir()
    try:
        _trace(pipeline, scratch / MODEL_FILE, opset, task)
        pack_external_data(scratch / MODEL_FILE, path, EXTERNAL_DATA_FILE)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def _trace(pipeline: EmbeddingPipeline, path: Path, opset: int, task: Task = EMBEDDING) -> None:
    """``pipeline`` (the task's torch module) traced with dynamic batch and sequence axes; its outputs are the
    task's, in order, each with its own axes."""
    names = input_names(pipeline)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes.update({output.name: output.axes for output in task.outputs})
    with torch.no_grad(), warnings.catch_warnings(), tracing_pipeline(pipeline, TRACE_ONNX):
        # The TorchScript exporter warns about its own deprecation and about tracing constants; neither
        # affects this graph, whose correctness the validation stage checks numerically.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            pipeline,
            dummy_inputs(pipeline),
            str(path),
            input_names=names,
            output_names=task.output_names,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


class OnnxFormat:
    """The ONNX step of the export pipeline: write ``model.onnx``, check it with ONNX Runtime, and with
    ``options.quantize`` replace it by an int8 graph that passes the quality gate against it."""

    name = "onnx"
    backend = "onnxruntime"

    def __init__(self, options):
        self.options = options
        # Fail fast, before the slow stages, on a bad --quantize mode or unreadable gate/calibration data.
        self.gate_pairs, self.calibration = _check_quantize_options(options) if options.quantize else (None, None)
        if options.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, found {options.dtype!r}")
        if options.dtype == "fp16":
            if options.quantize:
                why = "(fp16 for GPUs, int8 for CPUs); pick one"
                raise ConfigError(f"dtype='fp16' and quantize are alternatives {why}").in_cli_words(
                    f"--dtype fp16 and --quantize are alternatives {why}")
            from .gate_data import load_pairs_file

            self.gate_pairs = load_pairs_file(options.gate_data)

    def write(self, merged, folder: Path, log) -> Path:
        self.folder = folder
        return export_onnx(merged.pipeline, folder, opset=self.options.opset, task=merged.resolved.task)

    def validate(self, merged, model_path: Path, config, log) -> dict:
        from ..runtime.onnxruntime_backend import OnnxRuntimeBackend
        from ..runtime.tokenizer import TextTokenizer
        from .validate import compare_with_reference

        task = merged.resolved.task
        report = compare_with_reference(merged.references, OnnxRuntimeBackend(model_path).run,
                                        "The exported ONNX graph", task=task)
        log(f"ONNX Runtime == PyTorch reference: {task.describe(report.max_diff)} on shapes {report.shapes}")
        checks = {"onnx_vs_reference": report.to_dict()}
        if self.options.fuse_attention and self.options.dtype == "fp32":
            from .quantize import QUANTIZED_OPS

            if self.options.quantize and "Attention" not in QUANTIZED_OPS[self.options.quantize]:
                checks["attention_fusion"] = {"applied": False, "reason": STATIC_KEEPS_TRACED}
            else:
                # int8 turns Attention into QAttention, which has no attention_bias input: keep those unpacked.
                checks["attention_fusion"] = _fusion_step(merged, model_path, log,
                                                          pack_with_bias=not self.options.quantize)
        if not (self.options.quantize or self.options.dtype == "fp16"):
            return checks
        # One session at a time: a large model's weights are in memory once per session.
        backend = OnnxRuntimeBackend(model_path)
        if self.options.quantize:
            tokenizer = TextTokenizer(model_path.parent, config)
            checks["quantization"] = _quantize_step(self.options, self.gate_pairs, self.calibration,
                                                    model_path.parent, config, tokenizer, backend, log,
                                                    merged.resolved.task)
        if self.options.dtype == "fp16":
            checks["fp16"] = self._fp16_step(model_path, config, backend, log, merged.resolved.task)
        return checks

    def _fp16_step(self, fp32_path: Path, config, fp32_backend, log, task) -> dict:
        """Replace the validated fp32 graph by its fp16 version once that passes the quality gate against it."""
        from ..runtime.tokenizer import TextTokenizer
        from .fp16 import fp16_with_gate

        fp16_path = fp32_path.with_name("model_fp16.onnx")
        tokenizer = TextTokenizer(fp32_path.parent, config)
        result = fp16_with_gate(fp32_path, fp16_path, tokenizer, fp32_backend, self.gate_pairs, self.options.gate,
                                task)
        log(f"fp16: {task.gate.describe(result)} vs fp32 (LayerNorm, Softmax, pooling kept fp32)")
        return _adopt_graph(fp32_path, fp16_path, config, result, self.options, task)

    def manifest_entry(self, config) -> dict:
        from .external_data import external_files

        dtype = self.options.quantize or ("float16" if self.options.dtype == "fp16" else "float32")
        return {"format": "onnx", "opset": self.options.opset, "dtype": dtype,
                "files": [config.model_file, *external_files(self.folder / config.model_file)]}


def _fusion_step(merged, model_path: Path, log, pack_with_bias: bool = True) -> dict[str, Any]:
    """Replace the validated graph by its attention-fused version (runtime/onnxruntime_fusion.py) when the optimizer
    fuses something and the result still matches the PyTorch reference; otherwise keep it and say why. A graph with
    external data is fused the same way and written back as ``model.onnx`` + ``model.onnx_data``; in families fused
    by the rewrite alone only ``model.onnx`` is rewritten (its weights are never loaded)."""
    import onnx

    from ..errors import ValidationError
    from ..runtime.onnxruntime_backend import OnnxRuntimeBackend
    from ..runtime.onnxruntime_fusion import AttentionShape, fuse_attention, fused_blocks
    from .validate import compare_with_reference

    family = family_for(getattr(merged.encoder_config, "model_type", None))
    shape = AttentionShape.of(merged.encoder_config)
    if shape is None:
        return {"applied": False, "reason": "the encoder config has no num_attention_heads / hidden_size"}
    folder = model_path.parent
    external = (folder / EXTERNAL_DATA_FILE).exists()
    if external and family.bert_optimizer and (folder / EXTERNAL_DATA_FILE).stat().st_size > FUSION_WEIGHT_LIMIT:
        reason = (f"weights over {FUSION_WEIGHT_LIMIT / 1024**3:g} GiB: ONNX Runtime's optimizer would hold several "
                  "copies of them (16 GB resident measured for 2.4 GB of weights); the traced graph is kept")
        log(f"Attention fusion: {reason}")
        return {"applied": False, "reason": reason, "external_data": True}
    # The rewrite alone needs the graph, not the weights: an external-data graph is rewritten without loading its
    # data file (memory independent of the model's size), and the data file is kept as it is.
    graph_only = external and not family.bert_optimizer
    try:
        # The graph was loaded for this call alone, so the optimizer may rewrite it in place (no second copy).
        fused, counts = fuse_attention(onnx.load(str(model_path), load_external_data=not graph_only), shape,
                                       keep_input=False, bert_optimizer=family.bert_optimizer,
                                       pack_with_bias=pack_with_bias, weights_dir=str(folder) if graph_only else "")
    except Exception as err:  # a third-party optimizer; the traced graph is valid without it
        reason = f"ONNX Runtime's optimizer failed: {type(err).__name__}: {err}"
        log(f"Attention fusion: {reason}; the traced graph is kept")
        return {"applied": False, "reason": reason}
    if not fused_blocks(counts):
        log("Attention fusion: no attention block matched the fusion patterns; the traced graph is kept")
        return {"applied": False, "reason": "no attention block matched ONNX Runtime's fusion patterns nor "
                                            "peft_export's attention rewrite"}
    scratch = folder / ".fused"
    scratch.mkdir()
    try:
        candidate = scratch / MODEL_FILE
        if graph_only:  # the graph still points at model.onnx_data: give the candidate the same file beside it
            onnx.save(fused, str(candidate))
            _link_or_copy(folder / EXTERNAL_DATA_FILE, scratch / EXTERNAL_DATA_FILE)
        elif external:
            onnx.save_model(fused, str(candidate), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=EXTERNAL_DATA_FILE, size_threshold=1024)
        else:
            onnx.save(fused, str(candidate))
        del fused
        try:
            report = compare_with_reference(merged.references, OnnxRuntimeBackend(candidate).run,
                                            "The attention-fused ONNX graph", task=merged.resolved.task)
        except ValidationError as err:
            log(f"Attention fusion: not kept, {err}")
            return {"applied": False, "reason": str(err)}
        for name in [MODEL_FILE] + ([EXTERNAL_DATA_FILE] if external and not graph_only else []):
            os.replace(scratch / name, folder / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    forms = ", ".join(f"{counts[op]} {op}" for op in ("Attention", "MultiHeadAttention") if counts[op])
    log(f"Attention fusion: {fused_blocks(counts)} attention blocks fused ({forms}); "
        f"== PyTorch reference: {merged.resolved.task.describe(report.max_diff).split(', ')[0]}")
    optimizer = ["onnxruntime.transformers.optimizer"] if family.bert_optimizer else []
    return {"applied": True, "optimizer": " + ".join([*optimizer, "peft_export.export.attention_rewrite"]),
            "fused_operators": counts,
            **shape.to_dict(), "fused_vs_reference": report.to_dict(), "external_data": external}


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of a multi-GB file), or a copy where the filesystem has none."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _check_quantize_options(options) -> tuple[list[dict[str, str]], list[str] | None]:
    """Fail fast, before the slow stages, on a bad --quantize mode or unreadable gate/calibration data; the gate
    pairs, and the calibration texts when a file is given or the mode calibrates (read once, here)."""
    from .gate_data import calibration_texts, load_pairs_file
    from .quantize import QUANTIZE_MODES

    if options.quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, found {options.quantize!r}")
    # Both modes read calibration text: static int8 calibrates on it, and the int8 probe measures on it.
    calibration = calibration_texts(options.calibration_data)
    return load_pairs_file(options.gate_data), calibration


def _quantize_step(options, pairs: list[dict[str, str]], calibration: list[str] | None, folder: Path, config,
                   tokenizer, fp32_backend, log, task) -> dict[str, Any]:
    """Replace the validated fp32 graph by an int8 one that passes the quality gate against it."""
    from ..runtime.onnxruntime_backend import OnnxRuntimeBackend
    from .gate import backend_embedder, gate_dict, tokenize_inputs
    from .quantize import quantize_with_gate

    fp32_path = folder / config.model_file
    int8_path = folder / "model_int8.onnx"
    calibration = task.gate.calibration_inputs(calibration) if calibration else calibration
    result = quantize_with_gate(
        fp32_path, int8_path, backend_embedder(tokenizer, fp32_backend, task=task),
        lambda path: backend_embedder(tokenizer, OnnxRuntimeBackend(path), task=task), pairs, options.gate,
        mode=options.quantize, tokenize=tokenize_inputs(tokenizer, task),
        calibration_texts=calibration if options.quantize == "int8-static" else None, task=task,
        probe_texts=calibration, log=log,
    )
    chosen = next(a for a in result["attempts"] if a["strategy"] == result["chosen"])
    log(f"int8 ({result['chosen']}): {task.gate.describe(chosen)}")
    result["gate"] = gate_dict(options.gate, task)
    # The chosen rung's figures at the top, as the OpenVINO gates record them (`peft-export info` reads them there).
    result.update({"weight_format": "int8", **{key: chosen[key] for key in task.gate.summary}})
    if options.quantize == "int8-static":
        result["activations"] = "int8"
    return _adopt_graph(fp32_path, int8_path, config, result, options, task)


def _adopt_graph(fp32_path: Path, lossy_path: Path, config, result: dict[str, Any], options, task
                 ) -> dict[str, Any]:
    """Make the gated lossy graph the folder's model: drop the fp32 file, point the runtime config at the new one,
    and note where the gate's pairs came from."""
    from .external_data import external_files

    for name in external_files(fp32_path):
        (fp32_path.parent / name).unlink()
    fp32_path.unlink()
    config.model_file = lossy_path.name
    config.save(fp32_path.parent, task.runtime_config_file)
    result["gate_data"] = options.gate_data or "peft_export demo held-out pairs"
    return result
