"""int8 quantization with ONNX Runtime's quantizer, tried from fastest to safest until the quality gate passes.

ORT's default dynamic quantization (one scale per weight tensor) loses too much on small encoders (measured on
all-MiniLM-L6-v2: worst-sentence cosine 0.86). Per-channel weight scales fix most of it; the FFN output
projections, whose inputs have the widest ranges after GELU, are the layers that hurt most, so the next rung
keeps them in fp32.

On an attention-fused graph (export/ort_fusion.py) dynamic quantization also turns each ``Attention`` into
``QAttention`` (query/key/value weights int8, per channel); static quantization leaves it in fp32.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError, ValidationError, tool_step
from .families import DEFAULT_FAMILY, ModelFamily
from .quality import LOWER_GATE, LOWER_GATE_CLI, Embed, QualityGate, int8_rungs, measure_quality

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8", "int8-static")
# Operators each mode quantizes. Dynamic int8 turns a fused Attention into QAttention; the static (QDQ) quantizer
# has no form of Attention, so static graphs are quantized unfused (see OnnxFormat.validate).
QUANTIZED_OPS = {"int8": ("MatMul", "Attention"), "int8-static": ("MatMul",)}


def _weight_matmuls(model_path: Path, mode: str) -> list[str]:
    """Nodes ``mode`` quantizes: those of its operator types with a constant weight."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    constants = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in QUANTIZED_OPS[mode] and any(i in constants for i in n.input)]


class _CalibrationReader:
    """Feeds tokenized calibration texts to ORT's static quantizer, a few sentences per batch."""

    def __init__(self, tokenize: Callable[[list[str]], dict[str, np.ndarray]], texts: list[str], batch: int = 8):
        self._batches = iter([tokenize(texts[i : i + batch]) for i in range(0, len(texts), batch)])

    def get_next(self):
        return next(self._batches, None)


def _quantize(fp32: Path, out: Path, mode: str, exclude: list[str],
              tokenize: Callable | None, calibration_texts: list[str] | None, external: bool = False) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # quantizer's pre-process advice
    # Outputs of contrib operators (Attention, BiasGelu) have no inferred type; they are float.
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    if mode == "int8":
        with tool_step("ONNX Runtime's dynamic quantizer (quantize_dynamic)"):
            quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=list(QUANTIZED_OPS[mode]), nodes_to_exclude=exclude,
                             extra_options=extra, use_external_data_format=external)
        return
    if not calibration_texts or tokenize is None:
        raise ConfigError("int8-static needs calibration texts")
    with tool_step("ONNX Runtime's static quantizer (quantize_static)"):
        quantize_static(str(fp32), str(out), _CalibrationReader(tokenize, calibration_texts),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS[mode]),
                        nodes_to_exclude=exclude, extra_options={"ActivationSymmetric": True, **extra},
                        use_external_data_format=external)


def quantize_with_gate(
    fp32_path: Path,
    out_path: Path,
    reference: Embed,
    make_candidate: Callable[[Path], Embed],
    pairs: list[dict[str, str]],
    gate: QualityGate,
    mode: str = "int8",
    tokenize: Callable | None = None,
    calibration_texts: list[str] | None = None,
    family: ModelFamily = DEFAULT_FAMILY,
) -> dict:
    """Quantize ``fp32_path`` into ``out_path`` with the first rung that passes ``gate``; report every attempt."""
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, found {mode!r}")
    from .external_data import pack_external_data, uses_external_data

    matmuls = _weight_matmuls(fp32_path, mode)
    # A graph over 2 GiB keeps its weights in external data; the quantized one may still be too large for one
    # file, so the quantizer writes external data too, and the chosen candidate is packed into
    # ``<name>_data`` beside ``out_path`` (one data file with a fixed name, as for fp32).
    external = uses_external_data(fp32_path)
    attempts = []
    for strategy, excluded in int8_rungs(matmuls, family):
        with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
            candidate_path = Path(scratch) / out_path.name
            _quantize(fp32_path, candidate_path, mode, excluded, tokenize, calibration_texts, external)
            quality = measure_quality(reference, make_candidate(candidate_path), pairs)
            attempt = {"strategy": strategy, "excluded_nodes": len(excluded), "quantized_nodes":
                       len(matmuls) - len(excluded), **quality, "failures": gate.failures(quality)}
            attempts.append(attempt)
            logger.info("int8 %s: mean cos %.5f, worst %.5f, NDCG@10 retention %.4f", strategy,
                        quality["mean_cosine"], quality["worst_cosine"], quality["ndcg10_retention"])
            if not attempt["failures"]:
                if uses_external_data(candidate_path):
                    pack_external_data(candidate_path, out_path, out_path.name + "_data")
                else:
                    os.replace(candidate_path, out_path)
                return {"mode": mode, "chosen": strategy, "attempts": attempts, "external_data": external}
    summary = "; ".join(f"{a['strategy']}: {', '.join(a['failures'])}" for a in attempts)
    def say(lower: str, dynamic: str, openvino: str) -> str:
        other = (f" {dynamic}, or {openvino} (NNCF, with SmoothQuant), usually keep more quality than ONNX "
                 "Runtime's static quantizer." if mode == "int8-static" else "")
        return (f"No int8 variant passes the quality gate ({summary}). Nothing was written. Lower the gate "
                f"explicitly ({lower}) or export fp32.{other}")

    raise ValidationError(say(LOWER_GATE, "Dynamic quantize='int8'", "export_openvino_model(quantize='int8-static')")
                          ).in_cli_words(say(LOWER_GATE_CLI, "Dynamic --quantize int8",
                                             "`peft-export merge-openvino --quantize int8-static`"))
