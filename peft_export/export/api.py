"""The export entry points: merged or switchable, ONNX or OpenVINO, each run through the shared stages of
export/pipeline.py (merged) or export/switchable.py (one base graph + a weight file per adapter)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, require
from .pipeline import ExportOptions, ExportResult, run_export

logger = logging.getLogger(__name__)


def export_onnx_model(model_id: str, output: str | Path, log: Callable[[str], None] = logger.info,
                      **options: Any) -> ExportResult:
    """Merge an adapter (or, with ``stack_adapters=True``, several, all active at once) into ``model_id`` and write a
    validated ONNX export folder at ``output``.

    Keyword options are the fields of :class:`ExportOptions` (adapters, base, revision, force, opset, ...).
    """
    return run_onnx_export(ExportOptions(model_id=model_id, output=output, **options), log)


def _check_not_stacked_and_switchable(options: ExportOptions) -> None:
    if options.switchable and options.stack_adapters:
        why = ("a switchable export keeps each adapter separate and combines them at run time instead: "
               "set_adapter([a, b]) or encode(..., adapter=[a, b]) on LoRA adapters")
        raise ConfigError(f"stack_adapters=True merges adapters and cannot be combined with switchable=True; {why}"
                          ).in_cli_words(f"--stack-adapters merges adapters and cannot be combined with --switchable; "
                                         f"{why}")


def run_onnx_export(options: ExportOptions, log: Callable[[str], None] = logger.info) -> ExportResult:
    _check_not_stacked_and_switchable(options)
    if options.switchable:
        from .switchable import run_switchable_export

        return run_switchable_export(options, log)
    from .onnx import OnnxFormat

    return run_export(options, OnnxFormat(options), log)  # checks --quantize options before the slow stages


def export_openvino_model(model_id: str, output: str | Path, weight_format: str = "fp32",
                          log: Callable[[str], None] = logger.info, **options: Any) -> ExportResult:
    """Like :func:`export_onnx_model`, writing OpenVINO IR with ``weight_format`` fp32, fp16, int8 or int4 weights;
    ``quantize="int8-static"`` (with fp32 ``weight_format``) quantizes weights and activations with NNCF."""
    return run_openvino_export(ExportOptions(model_id=model_id, output=output, **options), weight_format, log)


def run_openvino_export(options: ExportOptions, weight_format: str = "fp32",
                        log: Callable[[str], None] = logger.info) -> ExportResult:
    from .openvino import OpenVinoFormat

    _check_not_stacked_and_switchable(options)
    if options.switchable:
        if weight_format != "fp32":
            why = ("the base graph and the adapters are exported in fp32 (a compressed base would no longer be the "
                   "model the adapters were validated against)")
            raise ConfigError(f"weight_format={weight_format!r} is not supported with switchable=True: {why}; "
                              "export with weight_format='fp32'").in_cli_words(
                f"--weight-format {weight_format} is not supported with --switchable: {why}; export with "
                "--weight-format fp32")
        require("openvino", "openvino")
        from .switchable import run_switchable_export

        return run_switchable_export(options, log, backend="openvino")
    graph_format = OpenVinoFormat(weight_format, options)  # checks its options before the slow stages
    require("openvino", "openvino")
    if graph_format.weight_format in ("int8", "int4"):
        require("nncf", "openvino")
    return run_export(options, graph_format, log)
