"""The verbs every runtime backend has (:class:`Backend`), and picking and opening one for an export folder (ONNX
Runtime or OpenVINO)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ConfigError
from .config import RuntimeConfig
from .lora_layout import Slot

BACKENDS = ("onnxruntime", "openvino")

Feeds = dict[str, np.ndarray]  # graph input name -> (batch, seq) array


@runtime_checkable
class Backend(Protocol):
    """What an exported model asks of its backend (``OnnxRuntimeBackend``, ``OpenVinoBackend``): every backend
    has every verb, so the model never probes for one. ``adapter`` arguments and results are the backend's own
    handles (from ``load_adapter`` / ``adapter_from_arrays``); None runs the base graph."""

    name: str  # "onnxruntime" | "openvino"
    adapter_suffix: str  # the file suffix of the adapter files this backend writes and reads
    providers: list  # what runs the graph: ONNX Runtime's execution providers, OpenVINO's execution devices
    input_names: list[str]  # the graph's text inputs (input_ids, attention_mask, token_type_ids)
    output_names: list[str]
    lora_input_names: list[str]  # a switchable graph's LoRA factor inputs ([] for a merged graph)
    parallel_requests: int  # batches run_batches runs at once (1: one after another)
    can_merge_adapters: bool  # whether merge_adapter builds a merged session (ONNX Runtime only)

    def run(self, feeds: Feeds, outputs: list[str] | None = None, adapter: Any = None) -> dict[str, np.ndarray]:
        """One inference of ``outputs`` (None: all); ``adapter`` is active for this run only."""

    def run_batches(self, batches: list[Feeds], outputs: list[str] | None = None, adapter: Any = None
                    ) -> list[dict[str, np.ndarray]]:
        """One inference per batch, in order, up to ``parallel_requests`` of them at once."""

    def output_width(self, name: str) -> int | None:
        """The last axis of output ``name`` where the graph fixes it (None when it is dynamic or absent)."""

    def describe(self) -> dict[str, Any]:
        """What was asked for and what runs (providers or devices, threads, precision)."""

    def read_adapter(self, path: Path) -> dict[str, np.ndarray]:
        """The tensors of an adapter file, by graph input name."""

    def load_adapter(self, path: Path, arrays: dict[str, np.ndarray] | None = None) -> Any:
        """A handle for runs of the adapter file ``path`` (``arrays``: what read_adapter gave for it)."""

    def adapter_from_arrays(self, arrays: dict[str, np.ndarray]) -> Any:
        """A handle for runs of graph-layout LoRA factors."""

    def adapter_arrays(self, adapter: Any) -> dict[str, np.ndarray]:
        """The graph-layout LoRA factors of a handle (copies)."""

    def merge_adapter(self, adapter: Any, slots: list[Slot], attention: dict[str, int] | None = None,
                      saved: list | None = None) -> Any:
        """A handle whose runs have ``adapter`` merged into the weights (``can_merge_adapters`` backends);
        ``saved``: the graph's saved parameters (lora_layout.SavedParam), whose copies the adapter may carry."""


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
) -> Backend:
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
