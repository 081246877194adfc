"""Pick and open the runtime backend for an export folder (ONNX Runtime or OpenVINO)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config import RuntimeConfig

BACKENDS = ("onnxruntime", "openvino")


def detect_backend(config: RuntimeConfig) -> str:
    """The backend the folder was exported for: its model file decides, then embedding_config.json's field."""
    if Path(config.model_file).suffix == ".xml":
        return "openvino"  # an IR runs on OpenVINO only, whatever an older config says
    if config.backend not in BACKENDS:
        raise ConfigError(f"embedding_config.json names backend {config.backend!r}; expected one of {BACKENDS}")
    return config.backend


def open_backend(
    folder: Path,
    config: RuntimeConfig,
    backend: str | None,
    device: str,
    *,
    providers: list | None = None,
    intra_op_threads: int | None = None,
    session_settings: Any = None,
    openvino_settings: Any = None,
    inference_precision: str | None = None,
    performance_hint: str | None = None,
):
    """Open ``folder``'s model with ``backend`` (None: the one it was exported for). Options for the other
    backend are refused rather than ignored."""
    chosen = detect_backend(config) if backend is None else backend
    if chosen not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)} or None (automatic), found {backend!r}")
    model_path = folder / config.model_file
    if chosen == "onnxruntime":
        openvino_only = {"openvino_settings": openvino_settings, "inference_precision": inference_precision,
                         "performance_hint": performance_hint}
        given = sorted(name for name, value in openvino_only.items() if value is not None)
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            verb = "apply" if len(given) > 1 else "applies"
            raise ConfigError(
                f"{', '.join(given)} {verb} to backend='openvino' only; this model runs on onnxruntime"
            ).in_cli_words(f"{flags} {verb} to OpenVINO only (--backend openvino); this model runs on onnxruntime")
        if model_path.suffix == ".xml":
            what = f"{folder} holds an OpenVINO model ({config.model_file}), which ONNX Runtime cannot run"
            raise ConfigError(
                f"{what}; load it with backend='openvino' (or leave backend unset), or export with "
                "`peft-export merge-onnx`."
            ).in_cli_words(f"{what}; drop --backend onnxruntime (or pass --backend openvino), or export it with "
                           "`peft-export merge-onnx`.")
        from .onnxruntime_backend import OnnxRuntimeBackend, SessionSettings

        settings = session_settings or SessionSettings()
        if intra_op_threads is not None:
            settings.intra_op_threads = intra_op_threads
        return OnnxRuntimeBackend(model_path, device, providers, settings, lora_inputs=bool(config.lora_slots))

    if providers is not None or session_settings is not None:
        raise ConfigError("providers and session_settings apply to ONNX Runtime; with backend='openvino' pass "
                          "device='CPU'|'GPU'|'AUTO' and openvino_settings / inference_precision / performance_hint")
    if (config.adapters or config.lora_slots) and model_path.suffix != ".xml":
        # The ONNX graph's LoRA inputs carry rank-0 initializers, which OpenVINO's ONNX reader turns into
        # constants it cannot multiply; the OpenVINO export strips them (export/switchable_graph.py).
        what = (f"{folder} is a switchable-adapter ONNX export ({', '.join(sorted(config.adapters))}), which "
                "OpenVINO cannot read")
        export = "export it for OpenVINO with `peft-export merge-openvino BASE --switchable --adapter NAME=PATH ...`"
        raise ConfigError(f"{what}. Load it with backend='onnxruntime', or {export}.").in_cli_words(
            f"{what}. Drop --backend openvino, or {export}.")
    from .openvino_backend import OpenVinoBackend, OpenVinoSettings

    settings = replace(openvino_settings) if openvino_settings is not None else OpenVinoSettings()
    if inference_precision is not None:
        settings.precision = inference_precision
    if performance_hint is not None:
        settings.performance_hint = performance_hint
    if intra_op_threads is not None:
        settings.num_threads = intra_op_threads
    return OpenVinoBackend(model_path, device, settings, padding=(config.pad_token_id, config.max_seq_length))
