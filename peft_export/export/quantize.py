"""int8 quantization with ONNX Runtime's quantizer, climbing a ladder built from a measurement until the quality gate
passes.

First a probe (export/int8_probe.py) runs the fp32 graph on calibration text: the few outlier input channels of each
weight MatMul (the cause of int8's collapse on trained encoders: all-mpnet-base-v2 falls to mean cosine 0.88) are
computed in fp32 beside the int8 product, and every weight node's int8 error is simulated. The ladder then starts
with every weight node int8 (per-channel weights) and keeps the most sensitive nodes in fp32, growing, until a rung
passes. The fp32 reference is embedded once; each rung is screened on a few pairs before the full gate.

On an attention-fused graph (runtime/onnxruntime_fusion.py) dynamic quantization also turns each ``Attention`` into
``QAttention`` (query/key/value weights int8, per channel); static quantization leaves it in fp32.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import ConfigError, ValidationError, tool_step
from ..tasks import EMBEDDING, Task
from .gate import Embed, QualityGate, lower_gate, screen_failures, screen_rows, screen_summary

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8", "int8-static")
# Operators each mode quantizes. Dynamic int8 turns a fused Attention into QAttention; the static (QDQ) quantizer
# has no form of Attention, so static graphs are quantized unfused (see OnnxFormat.validate).
QUANTIZED_OPS = {"int8": ("MatMul", "Attention"), "int8-static": ("MatMul",)}


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


# The ladder: the plain graph with every weight node int8 (fastest: nothing added), then the same with the outlier
# channels split off, then also the most sensitive nodes (probe's simulated int8 error) kept in fp32, growing.
PLAIN_RUNG = "all weight nodes int8"
FP32_SHARES = (0.0, 0.05, 0.15, 0.3)
PROBE_TEXTS = 32  # calibration texts the probe runs the fp32 graph on (two batches)


def sensitivity_rungs(order: list[str], shares: tuple[float, ...] = FP32_SHARES) -> Iterator[tuple[str, list[str]]]:
    """(strategy, nodes kept in fp32) per rung: the first ``share`` of ``order`` (most sensitive first), each rung
    keeping more nodes than the last."""
    last = -1
    for share in shares:
        count = min(len(order), int(np.ceil(share * len(order))))
        if count > last:
            last = count
            strategy = ("all weight nodes int8" if count == 0
                        else f"{count} most sensitive of {len(order)} weight nodes kept in fp32")
            yield strategy, order[:count]


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
    task: Task = EMBEDDING,
    probe_texts: list[str] | None = None,
    log: Callable[[str], None] = logger.info,
) -> dict:
    """Quantize ``fp32_path`` into ``out_path`` with the first rung that passes ``gate``; report every attempt.

    The fp32 reference is embedded once. ``probe_texts`` (default: the calibration texts) feed the probe
    (export/int8_probe.py) that finds outlier input channels, which every rung computes in fp32, and orders the
    nodes by simulated int8 error, which orders the ladder. Each rung is screened on a few pairs first: a screen
    whose worst cosine is already under the gate's (or whose mean is clearly under) ends the rung without the full
    gate. Each attempt records what it measured and how long each step took."""
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, found {mode!r}")
    from .external_data import pack_external_data, uses_external_data
    from .int8_probe import probe, sensitivity_order, split_outliers

    started = time.perf_counter()
    external = uses_external_data(fp32_path)
    texts = task.gate.inputs(pairs)
    clock = time.perf_counter()
    reference_embeddings = reference(texts)  # fp32, once for every rung
    reference_seconds = time.perf_counter() - clock
    rows = screen_rows(len(pairs), task)
    texts_for_probe = (probe_texts or calibration_texts or texts)[:PROBE_TEXTS]
    if tokenize is None:
        raise ConfigError("int8 quantization needs the export's tokenizer to probe the graph")
    nodes, probe_seconds = probe(fp32_path, QUANTIZED_OPS[mode],
                                 [tokenize(texts_for_probe[i : i + 16]) for i in range(0, len(texts_for_probe), 16)])
    order = sensitivity_order(nodes)
    split = [p for p in nodes if p.outlier_channels]
    log(f"int8 probe ({probe_seconds:.0f}s on {len(texts_for_probe)} texts): {len(nodes)} weight nodes, "
        f"{len(split)} with outlier input channels computed in fp32; most sensitive: "
        + ", ".join(f"{p.name} ({p.relative_error:.3f})" for p in sorted(nodes, key=lambda p: -p.relative_error)[:3]))
    attempts = []
    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
        rungs = [(PLAIN_RUNG, [], fp32_path, [])]  # the fastest graph: nothing added, nothing kept in fp32
        if split:
            split_path = Path(scratch) / ("split_" + fp32_path.name)
            side = split_outliers(fp32_path, split_path, nodes, external)
            channels = sum(len(p.outlier_channels) for p in split)
            rungs = rungs[:1] + [(f"{strategy}; outlier input channels of {len(split)} nodes ({channels} channels) "
                                  "in fp32", excluded, split_path, side) for strategy, excluded in
                                 sensitivity_rungs(order)]
        else:
            rungs += [(strategy, excluded, fp32_path, []) for strategy, excluded in sensitivity_rungs(order)][1:]
        for strategy, excluded, source, side in rungs:
            attempt, passed = _try_rung(source, out_path, Path(scratch), mode, excluded + side, tokenize,
                                        calibration_texts, external, make_candidate, texts, reference_embeddings,
                                        rows, gate, task)
            attempt = {"strategy": strategy, "excluded_nodes": len(excluded), "quantized_nodes":
                       len(nodes) - len(excluded), "fp32_nodes": excluded, **attempt}
            attempts.append(attempt)
            log(_describe(attempt, task))
            if passed:
                if uses_external_data(passed):
                    pack_external_data(passed, out_path, out_path.name + "_data")
                else:
                    os.replace(passed, out_path)
                return {"mode": mode, "chosen": strategy, "attempts": attempts, "external_data": external,
                        "probe": _probe_summary(nodes, probe_seconds, len(texts_for_probe)),
                        "seconds": {"reference": round(reference_seconds, 1),
                                    "total": round(time.perf_counter() - started, 1)}}
    summary = "; ".join(f"{a['strategy']}: {', '.join(a['failures'])}" for a in attempts)

    def say(lower: str, dynamic: str, openvino: str) -> str:
        other = (f" {dynamic}, or {openvino} (NNCF, with SmoothQuant), usually keep more quality than ONNX "
                 "Runtime's static quantizer." if mode == "int8-static" else "")
        return (f"No int8 variant passes the quality gate ({summary}). Nothing was written. Lower the gate "
                f"explicitly ({lower}) or export fp32.{other}")

    lower, lower_cli = lower_gate(task)
    raise ValidationError(say(lower, "Dynamic quantize='int8'", "export_openvino_model(quantize='int8-static')")
                          ).in_cli_words(say(lower_cli, "Dynamic --quantize int8",
                                             "`peft-export merge-openvino --quantize int8-static`"))


def _try_rung(source: Path, out_path: Path, scratch: Path, mode: str, exclude: list[str], tokenize,
              calibration_texts, external: bool, make_candidate, texts: list[str], reference: np.ndarray,
              rows: np.ndarray, gate: QualityGate, task: Task) -> tuple[dict, Path | None]:
    """Quantize one rung, screen it, then gate it; (figures and seconds, path of the candidate if it passed)."""
    candidate_path = scratch / f"candidate_{len(exclude)}_{out_path.name}"
    seconds = {}
    clock = time.perf_counter()
    _quantize(source, candidate_path, mode, exclude, tokenize, calibration_texts, external)
    seconds["quantize"] = round(time.perf_counter() - clock, 1)
    embed = make_candidate(candidate_path)
    clock = time.perf_counter()
    screen = task.quality(reference[rows], embed([texts[i] for i in rows]))
    seconds["screen"] = round(time.perf_counter() - clock, 1)
    attempt: dict = {"screen": screen_summary(screen, len(rows), task)}
    rejected = screen_failures(screen, gate, task)
    if rejected:
        return {**attempt, "failures": rejected, "seconds": seconds}, None
    clock = time.perf_counter()
    quality = task.quality(reference, embed(texts))
    seconds["gate"] = round(time.perf_counter() - clock, 1)
    failures = gate.failures(quality, task)
    return {**attempt, **quality, "failures": failures, "seconds": seconds}, None if failures else candidate_path


def _describe(attempt: dict, task: Task) -> str:
    seconds = ", ".join(f"{k} {v:.0f}s" for k, v in attempt["seconds"].items())
    if "gate" in attempt["seconds"]:
        figures = task.gate.describe(attempt)
    else:
        screen = attempt["screen"]
        figures = "screen " + ", ".join(f"{k} {v:.5f}" for k, v in screen.items() if k != "texts") + \
            f" on {screen['texts']} inputs"
    verdict = "passes" if not attempt["failures"] else "fails (" + "; ".join(attempt["failures"]) + ")"
    return f"int8 rung '{attempt['strategy']}': {figures}; {verdict} [{seconds}]"


def _probe_summary(nodes, seconds: float, texts: int) -> dict:
    ranked = sorted(nodes, key=lambda p: -p.relative_error)
    return {"texts": texts, "seconds": round(seconds, 1), "weight_nodes": len(nodes),
            "outlier_split_nodes": sum(1 for p in nodes if p.outlier_channels),
            "outlier_channels": sorted({c for p in nodes for c in p.outlier_channels}),
            "most_sensitive": [{"node": p.name, "simulated_error": round(p.relative_error, 4),
                                "input_absmax": round(p.input_absmax, 2), "rest_absmax": round(p.rest_absmax, 2)}
                               for p in ranked[:8]]}
