"""Convert an EmbeddingPipeline to OpenVINO IR (``openvino_model.xml`` + ``.bin``): the OpenVINO export format.

Conversion uses OpenVINO's PyTorch frontend on the merged pipeline (encoder + pooling + Dense + Normalize), so
the IR holds the whole embedding computation with dynamic batch and sequence dimensions. Weights are stored in
fp32, fp16 (``save_model(compress_to_fp16=True)``), int8 (NNCF weight-only compression, asymmetric, one scale
per output channel, climbing the same ladder as ONNX int8 until the quality gate passes) or int4 (NNCF, asymmetric,
one scale per group of input channels; the embedding matrix and the last linear layer in int8; the ladder trades
smaller groups and fewer int4 layers for quality). ``--quantize
int8-static`` quantizes activations too (``nncf.quantize`` calibrated on real text, transformer model type), so
the matrix products run in int8 (VNNI / AMX on CPUs that have them); it climbs the same ladder. Every check runs
the IR with the f32 inference precision hint, so it measures the export, not OpenVINO's default bf16 arithmetic on
CPUs that have bf16 units.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import torch

from ..errors import ConfigError, ValidationError, require, tool_step
from .families import DEFAULT_FAMILY, family_for, tracing_pipeline
from .onnx import OUTPUT_NAMES, dummy_inputs, input_names
from .gate import (QualityGate, backend_embedder, fp16_gate, gate_dict, lower_gate, screen_failures, screen_rows,
                   screen_summary, encodings_of)
from .gate_data import calibration_texts, docstring_pairs, load_pairs_file
from .int8_ladder import int8_rungs
from .validate import compare_with_reference

MODEL_XML = "openvino_model.xml"
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")
CONVERT_OPENVINO = "Converting to OpenVINO (openvino.convert_model)"
QUANTIZE_MODES = ("int8-static",)  # ONNX's dynamic "int8" has no OpenVINO counterpart at export time


def convert_to_openvino(pipeline: torch.nn.Module, output_names: list[str] = OUTPUT_NAMES):
    """Trace ``pipeline`` with OpenVINO's PyTorch frontend; inputs are int64 with dynamic (batch, sequence); its
    outputs are named ``output_names`` (the task's, in order)."""
    ov = require("openvino", "openvino")
    names = input_names(pipeline)
    example = dict(zip(names, dummy_inputs(pipeline)))
    shapes = [(name, ov.PartialShape([-1, -1]), ov.Type.i64) for name in names]
    with torch.no_grad(), warnings.catch_warnings(), tracing_pipeline(pipeline, CONVERT_OPENVINO):
        # Tracer warnings about Python control flow on shapes; the numeric validation is what counts.
        warnings.simplefilter("ignore")
        model = ov.convert_model(pipeline, example_input=example, input=shapes)
    keep_input_names(model, names)
    if len(model.outputs) != len(output_names):
        raise ConfigError(f"OpenVINO conversion produced {len(model.outputs)} outputs, expected {output_names}")
    for output, name in zip(model.outputs, output_names):
        output.get_tensor().set_names({name})
    return model


def keep_input_names(model, names: list[str]) -> None:
    """Make each of ``names`` the only name of the model input that carries it.

    OpenVINO's converters give an input every name its tensor had in the source graph: when a cast of an input to
    its own dtype is folded away (the last-token pooling's ``attention_mask.to(int64)``), the input also carries
    the cast's output name, and ``get_any_name()`` (what the runtime feeds by) may return that one instead."""
    by_name = {name: port for port in model.inputs for name in port.get_names()}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ConfigError(f"internal error: the OpenVINO model has no inputs named {missing[:3]}; its inputs are "
                          f"{[sorted(port.get_names()) for port in model.inputs][:6]}")
    for name in names:
        by_name[name].get_tensor().set_names({name})


def compile_f32(model_or_path, device: str = "CPU"):
    """The runtime backend with the f32 precision hint and no dynamic quantization: exact float arithmetic."""
    from ..runtime.openvino_backend import OpenVinoBackend, OpenVinoSettings

    return OpenVinoBackend(model_or_path, device=device, settings=OpenVinoSettings(precision="f32"))


def gate_for(weight_format: str, gate: QualityGate) -> QualityGate:
    return fp16_gate(gate) if weight_format == "fp16" else gate


def gate_pairs(gate_data: str | None) -> tuple[list[dict[str, str]], str]:
    """The quality gate's query/passage pairs and where they come from."""
    try:
        return load_pairs_file(gate_data), gate_data or "peft_export demo held-out pairs"
    except ImportError:  # no demo corpus in this installation: pairs built the same way, from stdlib docstrings
        return docstring_pairs(500), "standard-library docstring pairs"


@dataclass(frozen=True)
class Int4Rung:
    """One int4 candidate: NNCF's data-free int4 compression with ``group_size`` input channels per scale on the
    ``ratio`` share of linear layers it finds easiest to quantize (the rest, the embedding matrix and the last
    linear layer stay int8, asymmetric, per channel)."""

    group_size: int
    ratio: float

    @property
    def strategy(self) -> str:
        share = "every linear layer" if self.ratio == 1 else f"{self.ratio:.0%} of linear layers, the rest int8"
        return f"int4 asymmetric, groups of {self.group_size}, {share}"


INT4_LADDER = (Int4Rung(128, 1.0), Int4Rung(64, 1.0), Int4Rung(64, 0.8), Int4Rung(32, 0.6))


def _weight_matmuls(model) -> list[str]:
    """Names of the MatMuls whose second input is a weight (a constant, possibly behind a Convert)."""
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        source = op.input_value(1).get_node()
        if source.get_type_name() == "Convert":
            source = source.input_value(0).get_node()
        if source.get_type_name() == "Constant":
            names.append(op.get_friendly_name())
    return names


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF logs a statistics table at INFO and draws progress bars on stdout; keep the export's own log readable."""
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf_logger.setLevel(level)


def compress_weights_int8(model, ignored: list[str] | None = None):
    """NNCF weight-only int8 compression (asymmetric, per output channel); activations stay float."""
    nncf = require("nncf", "openvino")
    scope = nncf.IgnoredScope(names=list(ignored)) if ignored else None
    with _quiet_nncf(), tool_step("NNCF weight compression (nncf.compress_weights)"):
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=scope)


def compress_weights_int4(model, rung: Int4Rung):
    """NNCF weight-only int4 compression, data-free (no calibration set: the gate judges the result). A layer whose
    input channels are not a multiple of the group size gets the largest power-of-two group (at least 32) that
    divides them, or int8 weights if none does."""
    nncf = require("nncf", "openvino")
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    advanced = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST)
    with _quiet_nncf(), tool_step("NNCF int4 weight compression (nncf.compress_weights)"):
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=rung.group_size,
                                     ratio=rung.ratio, advanced_parameters=advanced)


def quantize_int8_static(model, calibration: list[dict[str, Any]], ignored: list[str] | None = None):
    """NNCF post-training quantization of weights and activations, calibrated on ``calibration`` (one feed dict per
    text, unpadded). The transformer model type keeps LayerNorm, Softmax and GELU in float and applies SmoothQuant
    and bias correction; NNCF picks its mixed preset for it (symmetric weights per channel, activations per tensor,
    asymmetric where their range needs it)."""
    nncf = require("nncf", "openvino")
    scope = nncf.IgnoredScope(names=list(ignored)) if ignored else None
    with _quiet_nncf(), tool_step("NNCF static int8 quantization (nncf.quantize)"):
        return nncf.quantize(model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(calibration), ignored_scope=scope)


class OpenVinoFormat:
    """The OpenVINO step of the export pipeline.

    ``write`` saves the fp32 IR; ``validate`` checks it (f32 hint) against the PyTorch reference within 1e-5, and
    for fp16 / int8 weights, or static int8 (``options.quantize == "int8-static"``), replaces it by the first
    candidate of the ladder that passes the quality gate against it.
    """

    name = "openvino"
    backend = "openvino"

    def __init__(self, weight_format: str = "fp32", options=None):
        if weight_format not in WEIGHT_FORMATS:
            detail = f"must be one of {', '.join(WEIGHT_FORMATS)}, found {weight_format!r}"
            raise ConfigError(f"weight_format {detail}").in_cli_words(f"--weight-format {detail}")
        quantize = getattr(options, "quantize", None)
        if quantize and quantize not in QUANTIZE_MODES:
            nncf = "(NNCF, int8 weights)", "(NNCF, int8 weights and activations)"
            raise ConfigError(
                f"quantize={quantize!r} is for export_onnx_model; with export_openvino_model use weight_format='int8' "
                f"{nncf[0]} or quantize='int8-static' {nncf[1]}"
            ).in_cli_words(f"--quantize {quantize} is for merge-onnx; with merge-openvino use --weight-format int8 "
                           f"{nncf[0]} or --quantize int8-static {nncf[1]}")
        if quantize and weight_format != "fp32":
            raise ConfigError(f"quantize={quantize!r} quantizes the fp32 weights itself; leave weight_format at "
                              f"'fp32' (found {weight_format!r})").in_cli_words(
                f"--quantize {quantize} quantizes the fp32 weights itself; leave --weight-format at fp32 (found "
                f"{weight_format})")
        self.weight_format = "int8" if quantize else weight_format
        self.quantize = quantize
        self.family = DEFAULT_FAMILY
        self.chosen_int4: Int4Rung | None = None
        self.gate = gate_for(weight_format, getattr(options, "gate", None) or QualityGate())
        self.pairs: list[dict[str, str]] = []
        self.pairs_source = ""
        self.calibration: list[str] = []
        if self.weight_format != "fp32":  # fail fast, before the slow stages, on unreadable gate data
            self.pairs, self.pairs_source = gate_pairs(getattr(options, "gate_data", None))
        if quantize:
            self.calibration = calibration_texts(getattr(options, "calibration_data", None))

    @property
    def lossy_kind(self) -> str:
        """How the lossy variant is named in logs and errors."""
        return "int8-static" if self.quantize else f"{self.weight_format}-weight"

    def write(self, merged, folder: Path, log: Callable[[str], None]) -> Path:
        ov = require("openvino", "openvino")
        path = folder / MODEL_XML
        task = merged.resolved.task
        if self.weight_format != "fp32" or self.quantize:
            task.check_export_mode("lossy", f"weight_format={self.weight_format!r}" if self.weight_format != "fp32"
                                   else f"quantize={self.quantize!r}")
        ov.save_model(convert_to_openvino(merged.pipeline, task.output_names), str(path), compress_to_fp16=False)
        return path

    def validate(self, merged, model_path: Path, config, log: Callable[[str], None]) -> dict[str, Any]:
        from ..runtime.tokenizer import TextTokenizer

        backend = compile_f32(model_path)  # the files as written, through the runtime's own loader
        report = compare_with_reference(merged.references, backend.run, "The exported OpenVINO model",
                                        task=merged.resolved.task)
        log(f"OpenVINO (f32 precision hint) == PyTorch reference: {merged.resolved.task.describe(report.max_diff)} "
            f"on shapes {report.shapes}")
        checks: dict[str, Any] = {"openvino_vs_reference": report.to_dict()}
        if self.weight_format == "fp32":
            return checks
        self.family = family_for(getattr(merged.encoder_config, "model_type", None))
        self.task = merged.resolved.task  # whose figures the gate compares
        tokenizer = TextTokenizer(model_path.parent, config)
        texts = self.task.gate.inputs(self.pairs)
        started = time.perf_counter()
        reference = backend_embedder(tokenizer, backend, task=self.task)(texts)  # fp32, once for every candidate
        reference_seconds = time.perf_counter() - started
        del backend
        calibration = [feeds for _, feeds in tokenizer.batches_of(encodings_of(
            tokenizer, self.task, self.task.gate.calibration_inputs(self.calibration)), 1)] if self.quantize else []
        result = self._compress_with_gate(model_path, reference, texts, tokenizer, calibration, log)
        result["seconds"] = {"reference": round(reference_seconds, 1),
                             "total": round(time.perf_counter() - started, 1)}
        result.update({"reference": "this IR with fp32 weights (validated above)", "inference_precision": "f32",
                       "gate": gate_dict(self.gate, self.task), "gate_data": self.pairs_source})
        if self.quantize:
            result.update({"activations": "int8", "calibration_texts": len(calibration)})
        checks["quantization" if self.quantize else "weight_compression"] = result
        return checks

    def _candidates(self, model, calibration: list[dict[str, Any]]):
        """(strategy, candidate model, excluded nodes) in the order the gate tries them; the int4 rung is kept on
        ``self.chosen_int4`` for the manifest."""
        if self.weight_format == "fp16":
            yield "all weights stored as fp16", model, []
            return
        if self.weight_format == "int4":
            for rung in INT4_LADDER:
                self.chosen_int4 = rung
                yield rung.strategy, compress_weights_int4(model.clone(), rung), []
            return
        for strategy, excluded in int8_rungs(_weight_matmuls(model), self.family):
            if self.quantize:
                yield strategy, quantize_int8_static(model.clone(), calibration, excluded), excluded
            else:
                yield strategy, compress_weights_int8(model.clone(), excluded), excluded

    def _compress_with_gate(self, model_path: Path, reference: np.ndarray, texts: list[str], tokenizer,
                            calibration: list[dict[str, Any]], log) -> dict[str, Any]:
        """Write each candidate beside the fp32 IR, screen it on a few pairs, then gate it as loaded from disk
        against ``reference`` (the fp32 embeddings of ``texts``, computed once); the first that passes replaces the
        fp32 IR. Each attempt records what it measured and how long each step took."""
        ov = require("openvino", "openvino")
        model = ov.Core().read_model(str(model_path))
        attempts = []
        matmuls = len(_weight_matmuls(model))
        rows = screen_rows(len(self.pairs), self.task)
        describe = self.task.gate.describe
        candidates = self._candidates(model, calibration)
        while True:
            clock = time.perf_counter()
            step = next(candidates, None)  # NNCF runs here
            if step is None:
                break
            strategy, candidate, excluded = step
            seconds = {"quantize": round(time.perf_counter() - clock, 1)}
            with tempfile.TemporaryDirectory(dir=model_path.parent) as scratch:
                path = Path(scratch) / MODEL_XML
                ov.save_model(candidate, str(path), compress_to_fp16=self.weight_format == "fp16")
                embed = backend_embedder(tokenizer, compile_f32(path), task=self.task)
                clock = time.perf_counter()
                screen = self.task.quality(reference[rows], embed([texts[i] for i in rows]))
                seconds["screen"] = round(time.perf_counter() - clock, 1)
                attempt = {"strategy": strategy, "excluded_nodes": len(excluded),
                           "quantized_nodes": matmuls - len(excluded), "seconds": seconds,
                           "screen": screen_summary(screen, len(rows), self.task),
                           "failures": screen_failures(screen, self.gate, self.task)}
                attempts.append(attempt)
                if attempt["failures"]:
                    log(f"{self.lossy_kind} ({strategy}): screen {describe(screen)}; fails "
                        f"({'; '.join(attempt['failures'])}) [quantize {seconds['quantize']:.0f}s, screen "
                        f"{seconds['screen']:.0f}s]")
                    continue
                clock = time.perf_counter()
                quality = self.task.quality(reference, embed(texts))
                seconds["gate"] = round(time.perf_counter() - clock, 1)
                attempt.update({**quality, "failures": self.gate.failures(quality, self.task)})
                log(f"{self.lossy_kind} ({strategy}): {describe(quality)} [quantize {seconds['quantize']:.0f}s, "
                    f"screen {seconds['screen']:.0f}s, gate {seconds['gate']:.0f}s]")
                if not attempt["failures"]:
                    for suffix in (".xml", ".bin"):
                        os.replace(path.with_suffix(suffix), model_path.with_suffix(suffix))
                    return {"weight_format": self.weight_format, "chosen": strategy, **quality, "attempts": attempts}
        summary = "; ".join(f"{a['strategy']}: {', '.join(a['failures'])}" for a in attempts)
        def say(lower: str, fallbacks: tuple[str, str, str]) -> str:
            also = fallbacks[0] if self.quantize else fallbacks[1] if self.weight_format == "int4" else fallbacks[2]
            return (f"No {self.lossy_kind} OpenVINO model passes the quality gate ({summary}). Nothing was "
                    f"written. Lower the gate explicitly ({lower}) or export {also}.")

        lower, lower_cli = lower_gate(self.task)
        raise ValidationError(say(lower, ("without quantize", "with weight_format='int8' (or 'fp32')",
                                               "with weight_format='fp32'"))).in_cli_words(
            say(lower_cli, ("without --quantize", "with --weight-format int8 (or fp32)",
                                 "with --weight-format fp32")))

    def manifest_entry(self, config) -> dict[str, Any]:
        from importlib.metadata import version

        entry = {
            "format": "openvino",
            "weight_format": self.weight_format,
            "dtype": "float32",  # inputs of the arithmetic and the outputs; weights are stored as weight_format
            "files": [config.model_file, str(Path(config.model_file).with_suffix(".bin"))],
            "openvino_version": version("openvino"),
        }
        if self.quantize:
            entry["quantization"] = {"tool": "nncf", "nncf_version": version("nncf"), "mode": self.quantize,
                                     "method": "nncf.quantize, model_type=transformer",
                                     "preset": "mixed", "weights": "int8, symmetric, per channel",
                                     "activations": "int8, per tensor, calibrated"}
        elif self.weight_format == "int8":
            entry["weight_compression"] = {"tool": "nncf", "nncf_version": version("nncf"), "mode": "int8_asym",
                                           "granularity": "per_channel"}
        elif self.weight_format == "int4" and self.chosen_int4:
            entry["weight_compression"] = {"tool": "nncf", "nncf_version": version("nncf"), "mode": "int4_asym",
                                           "granularity": "per_group", **asdict(self.chosen_int4),
                                           "backup_mode": "int8_asym", "data_free": True}
        return entry
