"""Convert an EmbeddingPipeline to OpenVINO IR (``openvino_model.xml`` + ``.bin``): the OpenVINO export format.

Conversion uses OpenVINO's PyTorch frontend on the merged pipeline (encoder + pooling + Dense + Normalize), so
the IR holds the whole embedding computation with dynamic batch and sequence dimensions. Weights are stored in
fp32, fp16 (``save_model(compress_to_fp16=True)``) or int8 (NNCF weight-only compression, asymmetric, one scale
per output channel). Every check runs the IR with the f32 inference precision hint, so it measures the export,
not OpenVINO's default bf16 arithmetic on CPUs that have bf16 units.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError, require
from .onnx import OUTPUT_NAMES, dummy_inputs, input_names
from .quality import (
    QualityGate, backend_embedder, docstring_pairs, enforce, gate_dict, load_pairs_file, measure_quality,
)
from .validate import compare_with_reference

MODEL_XML = "openvino_model.xml"
WEIGHT_FORMATS = ("fp32", "fp16", "int8")
# fp16 weights lose almost nothing; their gate is never looser than this, whatever --min-mean-cosine says.
FP16_MIN_MEAN_COSINE = 0.999


def convert_to_openvino(pipeline: torch.nn.Module):
    """Trace ``pipeline`` with OpenVINO's PyTorch frontend; inputs are int64 with dynamic (batch, sequence)."""
    ov = require("openvino", "openvino")
    names = input_names(pipeline)
    example = dict(zip(names, dummy_inputs(pipeline)))
    shapes = [(name, ov.PartialShape([-1, -1]), ov.Type.i64) for name in names]
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings about Python control flow on shapes; the numeric validation is what counts.
        warnings.simplefilter("ignore")
        model = ov.convert_model(pipeline, example_input=example, input=shapes)
    if len(model.outputs) != len(OUTPUT_NAMES):
        raise ConfigError(f"OpenVINO conversion produced {len(model.outputs)} outputs, expected {OUTPUT_NAMES}")
    for output, name in zip(model.outputs, OUTPUT_NAMES):
        output.get_tensor().set_names({name})
    return model


def compress_weights_int8(model):
    """NNCF weight-only int8 compression (asymmetric, per output channel); activations stay float."""
    nncf = require("nncf", "openvino")
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # NNCF logs a statistics table at INFO
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and draws a progress bar on stdout
            return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    finally:
        nncf_logger.setLevel(level)


def compile_f32(model_or_path, device: str = "CPU"):
    """The runtime backend with the f32 precision hint and no dynamic quantization: exact float arithmetic."""
    from ..runtime.openvino_backend import OpenVinoBackend, OpenVinoSettings

    return OpenVinoBackend(model_or_path, device=device, settings=OpenVinoSettings(precision="f32"))


def gate_for(weight_format: str, gate: QualityGate) -> QualityGate:
    if weight_format == "fp16":
        return replace(gate, min_mean_cosine=max(gate.min_mean_cosine, FP16_MIN_MEAN_COSINE))
    return gate


def gate_pairs(gate_data: str | None) -> tuple[list[dict[str, str]], str]:
    """The quality gate's query/passage pairs and where they come from."""
    try:
        return load_pairs_file(gate_data), gate_data or "peft_export demo held-out pairs"
    except ImportError:  # no demo corpus in this installation: pairs built the same way, from stdlib docstrings
        return docstring_pairs(500), "standard-library docstring pairs"


class OpenVinoFormat:
    """The OpenVINO step of the export pipeline: write IR (fp32/fp16/int8 weights), validate, gate quality."""

    name = "openvino"
    backend = "openvino"

    def __init__(self, weight_format: str = "fp32", options=None):
        if weight_format not in WEIGHT_FORMATS:
            raise ConfigError(f"--weight-format must be one of {', '.join(WEIGHT_FORMATS)}, found {weight_format!r}")
        if options is not None and getattr(options, "quantize", None):
            raise ConfigError(f"--quantize {options.quantize} is for merge-onnx; with merge-openvino use "
                              "--weight-format int8 (NNCF)")
        self.weight_format = weight_format
        self.gate = gate_for(weight_format, getattr(options, "gate", None) or QualityGate())
        self.pairs: list[dict[str, str]] = []
        self.pairs_source = ""
        if weight_format != "fp32":  # fail fast, before the slow stages, on unreadable gate data
            self.pairs, self.pairs_source = gate_pairs(getattr(options, "gate_data", None))
        self._f32_backend = None
        self._f32_report: dict[str, Any] | None = None

    def write(self, merged, folder: Path, log: Callable[[str], None]) -> Path:
        ov = require("openvino", "openvino")
        model = convert_to_openvino(merged.pipeline)
        if self.weight_format != "fp32":
            # Check the conversion in f32 before compressing; the compressed model is gated against this one.
            self._f32_backend = compile_f32(model)
            report = compare_with_reference(merged.references, self._f32_backend.run,
                                            "The converted OpenVINO model (before weight compression)")
            self._f32_report = report.to_dict()
            log(f"OpenVINO (f32, before {self.weight_format} compression) == PyTorch reference: sentence "
                f"{report.max_diff['sentence_embedding']:.2e} on shapes {report.shapes}")
            if self.weight_format == "int8":
                model = compress_weights_int8(model.clone())
        path = folder / MODEL_XML
        ov.save_model(model, str(path), compress_to_fp16=self.weight_format == "fp16")
        return path

    def validate(self, merged, model_path: Path, config, log: Callable[[str], None]) -> dict[str, Any]:
        from ..runtime.tokenizer import TextTokenizer

        backend = compile_f32(model_path)  # the files as written, through the runtime's own loader
        if self.weight_format == "fp32":
            report = compare_with_reference(merged.references, backend.run, "The exported OpenVINO model")
            log(f"OpenVINO (f32 precision hint) == PyTorch reference: sentence "
                f"{report.max_diff['sentence_embedding']:.2e}, tokens {report.max_diff['token_embeddings']:.2e} "
                f"on shapes {report.shapes}")
            return {"openvino_vs_reference": report.to_dict()}
        tokenizer = TextTokenizer(model_path.parent, config)
        quality = measure_quality(backend_embedder(tokenizer, self._f32_backend), backend_embedder(tokenizer, backend),
                                  self.pairs)
        log(f"{self.weight_format} weights: mean cosine {quality['mean_cosine']:.5f}, worst "
            f"{quality['worst_cosine']:.5f}, NDCG@10 retention {quality['ndcg10_retention']:.4f} on "
            f"{quality['texts']} texts")
        enforce(self.gate, quality, f"The {self.weight_format}-weight OpenVINO model")
        gate = {"weight_format": self.weight_format, "reference": "the same IR in fp32 (validated above)",
                "inference_precision": "f32", **quality, "gate": gate_dict(self.gate), "gate_data": self.pairs_source}
        return {"openvino_vs_reference": self._f32_report, "weight_compression": gate}

    def manifest_entry(self, config) -> dict[str, Any]:
        from importlib.metadata import version

        entry = {
            "format": "openvino",
            "weight_format": self.weight_format,
            "dtype": "float32",  # inputs of the arithmetic and the outputs; weights are stored as weight_format
            "files": [config.model_file, str(Path(config.model_file).with_suffix(".bin"))],
            "openvino_version": version("openvino"),
        }
        if self.weight_format == "int8":
            entry["weight_compression"] = {"tool": "nncf", "nncf_version": version("nncf"), "mode": "int8_asym",
                                           "granularity": "per_channel"}
        return entry
