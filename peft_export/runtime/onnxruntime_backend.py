"""ONNX Runtime backend: one InferenceSession, explicit providers and thread settings."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, UnsafeModelError, require
from . import onnxruntime_adapters as adapters
from .export_files import confined
from .lora_layout import Slot
from .onnxruntime_merge_adapter import MergedAdapter, MergedSessions, release_free_memory

logger = logging.getLogger(__name__)

_DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


@dataclass
class SessionSettings:
    """Session options, with defaults chosen for a latency-sensitive server on a small CPU.

    intra_op_threads=None uses every physical core ORT sees. Worker threads spin between operators while a run is
    in progress and stop spinning when it ends (``stop_spinning_between_runs``, ORT's
    ``session.force_spinning_stop``): batch-1 latency drops by 20-30% against sleeping threads, and idle
    sessions take no CPU, so several sessions used one after another do not slow each other down (measured in
    ``benchmarks/investigations/bench_spinning.py``). Sessions that run *at the same time* still compete for the cores
    while they spin; for that, ``throughput()`` turns spinning off.

    ``fuse_skip_layer_norm=None`` lets ONNX Runtime fuse residual Add + LayerNormalization into its
    ``SkipLayerNormalization`` kernel only on GPU providers. On the CPU that kernel is slower than the two operators it
    replaces (ORT 1.32, AVX-512 Xeon, one of MiniLM's 384-wide rows of 15 tokens: 17.6 us against 4.8 + 1.3 us;
    1,280 tokens: 1,095 us against 147 + 101 us; ``benchmarks/investigations/bench_ort_kernels.py``), so CPU sessions
    keep them apart; ``True``/``False`` force it either way.
    """

    intra_op_threads: int | None = None
    inter_op_threads: int = 1
    allow_spinning: bool = True
    stop_spinning_between_runs: bool = True
    enable_cpu_mem_arena: bool = True
    graph_optimization_level: str = "all"
    io_binding: bool | None = None  # None: on with the CUDA provider (inputs copied once, only wanted outputs back)
    fuse_skip_layer_norm: bool | None = None  # None: on GPU providers only (see above)

    @classmethod
    def latency(cls, intra_op_threads: int | None = None) -> SessionSettings:
        """One caller at a time, batch-1 latency first: the defaults (threads spin during runs, stop after)."""
        return cls(intra_op_threads=intra_op_threads)

    @classmethod
    def throughput(cls, intra_op_threads: int | None = None) -> SessionSettings:
        """Several sessions or busy threads running at the same time in one process: spinning off, so a thread
        waiting for work sleeps instead of taking a core another session needs. Costs batch-1 latency when
        a session runs alone; no measurable difference at batch 32."""
        return cls(intra_op_threads=intra_op_threads, allow_spinning=False)

    def to_session_options(self, ort):
        options = ort.SessionOptions()
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = int(self.intra_op_threads)
        options.inter_op_num_threads = int(self.inter_op_threads)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "1" if self.allow_spinning else "0")
        if self.allow_spinning and self.stop_spinning_between_runs:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        options.enable_cpu_mem_arena = self.enable_cpu_mem_arena
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if self.graph_optimization_level not in levels:
            raise ConfigError(
                f"graph_optimization_level must be one of {', '.join(levels)}, found {self.graph_optimization_level!r}"
            )
        options.graph_optimization_level = levels[self.graph_optimization_level]
        return options

    def disabled_optimizers(self, providers: list) -> list[str]:
        """ONNX Runtime graph transformers to leave out (``InferenceSession(disabled_optimizers=...)``) for a session
        whose first provider is ``providers[0]``."""
        first = provider_name(providers[0]) if providers else None
        fuse = self.fuse_skip_layer_norm if self.fuse_skip_layer_norm is not None else first != "CPUExecutionProvider"
        return [] if fuse else ["SkipLayerNormFusion"]


def provider_name(provider: str | tuple) -> str:
    """The name of a provider entry: ``"CUDAExecutionProvider"`` or ``("CUDAExecutionProvider", {options})``."""
    return provider[0] if isinstance(provider, tuple) else provider


def resolve_providers(device: str, providers: list | None, available: list[str]) -> list:
    """Explicit providers win; otherwise the device picks them. Unknown names are refused."""
    if providers is None:
        if device not in _DEVICE_PROVIDERS:
            raise ConfigError(f"device must be one of {', '.join(_DEVICE_PROVIDERS)}, found {device!r}")
        providers = list(_DEVICE_PROVIDERS[device])
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            detail = (f"needs the CUDA execution provider, which this onnxruntime build lacks (available: "
                      f"{', '.join(available)}). Install it with: pip install 'peft_export[gpu]' (onnxruntime-gpu, "
                      "instead of onnxruntime).")
            raise ConfigError(f"device='cuda' {detail}").in_cli_words(f"--device cuda {detail}")
    for provider in providers:
        name = provider_name(provider)
        if name not in available:
            raise ConfigError(f"Execution provider {name!r} is not available; available: {', '.join(available)}")
    return providers


def check_external_data(model_path: Path) -> None:
    """Refuse ONNX files whose external data is written as a location outside the model folder (absolute, ``..``).
    Confined by the path written, not by where a symlink resolves: a Hugging Face cache snapshot is symlinks into
    its blobs/ folder by design (what the files hold is checked against the manifest's hashes instead)."""
    import onnx  # only present with the export extra; without it ORT's own loader checks paths

    from google.protobuf.message import DecodeError

    folder = model_path.parent
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except DecodeError as err:
        raise ConfigError(
            f"{model_path} is not a readable ONNX model (protobuf: {err}); the file is truncated or corrupt. "
            "Export the folder again."
        ) from err
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key != "location":
                continue
            try:
                confined(folder, entry.value, f"tensor {tensor.name!r}'s external data")
            except UnsafeModelError as err:
                raise UnsafeModelError(
                    f"{model_path}: tensor {tensor.name!r} points to external data {entry.value!r} outside the "
                    "model folder; refused"
                ) from err


def _open_session(ort, model_path: Path, options, providers: list, settings: SessionSettings):
    """An InferenceSession; a file ONNX Runtime cannot parse or load is a ConfigError naming it."""
    state = ort.capi.onnxruntime_pybind11_state
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=providers,
                                    disabled_optimizers=settings.disabled_optimizers(providers))
    except Exception as err:
        if "escapes model directory" in str(err):  # ONNX Runtime's own check: data behind a symlink out of the folder
            raise UnsafeModelError(f"{model_path} points to external data through a symlink outside the model "
                                   f"folder; refused (ONNX Runtime: {str(err).split('Error: ', 1)[-1]})") from err
        # A file it cannot parse, or a graph it finds invalid at load (a changed byte can make either: InvalidArgument
        # "Load model from ... failed: Invalid model. Node input ... is not a graph input" escaped as a raw error).
        if not (isinstance(err, (state.InvalidProtobuf, state.InvalidGraph, state.NoSuchFile))
                or f"Load model from {model_path} failed" in str(err)):
            raise
        detail = " ".join(str(err).split())[-300:]
        raise ConfigError(
            f"ONNX Runtime cannot load {model_path}: {detail}. The file is truncated or corrupt; export the folder "
            "again."
        ) from err


class OnnxRuntimeBackend:
    """The verbs of every backend (:class:`.backends.Backend`) on one InferenceSession; adapters of switchable graphs
    are ONNX Runtime's ``.onnx_adapter`` files (:mod:`.onnxruntime_adapters`), and this backend alone can merge one
    into a session of its own (``merge_adapter``, :mod:`.onnxruntime_merge_adapter`)."""

    name = "onnxruntime"
    adapter_suffix = adapters.ADAPTER_SUFFIX
    parallel_requests = 1  # one run at a time: a session already uses every core it is given
    can_merge_adapters = True

    def __init__(self, model_path: Path, device: str = "cpu", providers: list | None = None,
                 settings: SessionSettings | None = None, lora_inputs: bool = False):
        ort = require("onnxruntime", "onnxruntime")
        if not model_path.is_file():
            raise ConfigError(f"ONNX model file not found: {model_path}")
        try:
            check_external_data(model_path)
        except ImportError:
            pass  # onnx is not installed in a serving-only environment; ORT rejects paths outside the folder
        self.settings = settings or SessionSettings()
        available = ort.get_available_providers()
        requested = resolve_providers(device, providers, available)
        options = self.settings.to_session_options(ort)
        if lora_inputs:
            # A switchable graph's LoRA weights are overridable initializers by design; ORT logs a warning for
            # each one at load ("will not be treated as constant"). Errors still show.
            options.log_severity_level = 3
        # Held open for merge_adapter, which reads the graph again: through this descriptor it reads the file this
        # session was made from, even after an export --force has put another one at the path.
        self._graph_fd = os.open(model_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        weakref.finalize(self, os.close, self._graph_fd)
        self.session = _open_session(ort, model_path, options, requested, self.settings)
        self.model_path = model_path
        self._requested = requested
        self._merged_sessions: MergedSessions | None = None
        self.providers = self.session.get_providers()
        wanted = [provider_name(p) for p in requested]
        if wanted and wanted[0] != "CPUExecutionProvider" and self.providers[0] != wanted[0]:
            logger.warning(
                "Requested %s but ONNX Runtime fell back to %s; embeddings are computed on the CPU.",
                wanted[0], self.providers[0],
            )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.lora_input_names = [i.name for i in self.session.get_overridable_initializers()]
        self._scratch: Path | None = None
        on_gpu = self.providers[0] == "CUDAExecutionProvider"
        self.io_binding = on_gpu if self.settings.io_binding is None else bool(self.settings.io_binding)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None,
            adapter: adapters.OrtAdapter | None = None) -> dict[str, np.ndarray]:
        """One inference; ``adapter`` (from load_adapter / adapter_from_arrays) is active for this run only."""
        names = outputs or self.output_names
        session, options = self.session, None
        if isinstance(adapter, MergedAdapter):
            session = adapter.session  # the adapter is in that session's weights
        elif adapter is not None:
            options = adapters.run_options(adapter)
        if self.io_binding:
            return self._run_bound(session, feeds, names, options)
        values = session.run(names, {k: feeds[k] for k in self.input_names}, options)
        return dict(zip(names, values))

    def run_batches(self, batches: list[dict[str, np.ndarray]], outputs: list[str] | None = None,
                    adapter: adapters.OrtAdapter | None = None) -> list[dict[str, np.ndarray]]:
        """One run per batch, one after another (``parallel_requests`` is 1)."""
        return [self.run(feeds, outputs, adapter=adapter) for feeds in batches]

    def _run_bound(self, session, feeds: dict[str, np.ndarray], names: list[str], options) -> dict[str, np.ndarray]:
        """I/O binding: ONNX Runtime copies each input to the device once and only the requested outputs come
        back, written straight into host memory (a graph output nobody asked for never leaves the GPU)."""
        binding = session.io_binding()
        for name in self.input_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        for name in names:
            binding.bind_output(name, "cpu")
        if options is None:
            session.run_with_iobinding(binding)
        else:
            session.run_with_iobinding(binding, options)
        return dict(zip(names, binding.copy_outputs_to_cpu()))

    def output_width(self, name: str) -> int | None:
        """The last axis of output ``name`` where the graph fixes it (None when it is dynamic or absent)."""
        for output in self.session.get_outputs():
            if output.name == name and output.shape and isinstance(output.shape[-1], int):
                return int(output.shape[-1])
        return None

    def describe(self) -> dict:
        """What was asked for and what ONNX Runtime runs (providers, threads)."""
        return {"backend": self.name, "providers": self.providers,
                "intra_op_threads": self.settings.intra_op_threads, "allow_spinning": self.settings.allow_spinning,
                "stop_spinning_between_runs": self.settings.stop_spinning_between_runs, "io_binding": self.io_binding,
                "disabled_optimizers": self.settings.disabled_optimizers(self._requested)}

    # ----- adapters of switchable graphs -----
    def read_adapter(self, path: Path) -> dict[str, np.ndarray]:
        """The tensors of an adapter file, by graph input name."""
        return adapters.read_adapter_arrays(Path(path))

    def load_adapter(self, path: Path, arrays: dict[str, np.ndarray] | None = None) -> adapters.OrtAdapter:
        """A handle for runs; ``arrays`` (what :meth:`read_adapter` gave for this file) are kept with it."""
        return adapters.load_adapter_file(Path(path), arrays)

    def adapter_from_arrays(self, arrays: dict[str, np.ndarray]) -> adapters.OrtAdapter:
        """An adapter from graph-layout arrays, kept in a private folder that is removed with this backend."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="peft-export-adapters-"))
            weakref.finalize(self, shutil.rmtree, str(self._scratch), True)
        fd, name = tempfile.mkstemp(suffix=adapters.ADAPTER_SUFFIX, dir=self._scratch)
        os.close(fd)
        adapters.write_adapter_file(Path(name), arrays)
        return adapters.load_adapter_file(Path(name), {k: np.array(v, dtype=np.float32) for k, v in arrays.items()})

    def adapter_arrays(self, adapter: adapters.OrtAdapter | MergedAdapter) -> dict[str, np.ndarray]:
        if isinstance(adapter, MergedAdapter):
            adapter = adapter.source
        if adapter.arrays is not None:
            return {name: value.copy() for name, value in adapter.arrays.items()}
        return adapters.read_adapter_arrays(adapter.path)

    def graph_bytes(self) -> bytes:
        """The model file as this session loaded it (read through the descriptor opened then)."""
        if not hasattr(os, "pread"):
            return self.model_path.read_bytes()
        size, parts, offset = os.fstat(self._graph_fd).st_size, [], 0
        while offset < size:
            part = os.pread(self._graph_fd, min(size - offset, 1 << 24), offset)
            if not part:
                break
            parts.append(part)
            offset += len(part)
        return b"".join(parts)

    def merge_adapter(self, adapter: adapters.OrtAdapter, slots: list[Slot],
                      attention: dict[str, int] | None = None, saved: list | None = None) -> MergedAdapter:
        """A handle whose runs go to a new session of the base graph with ``adapter`` merged into its weights (same
        settings and providers as this backend's session; attention fused when the export recorded its shape)."""
        if self.settings.allow_spinning and not self.settings.stop_spinning_between_runs:
            logger.warning(
                "merge_adapter with threads that keep spinning after each run: every merged adapter is another "
                "session whose threads spin, and they fight for the cores (batch 1 measured twice as slow when "
                "calls rotate between merged adapters). Keep stop_spinning_between_runs=True (the default)."
            )
        if self._merged_sessions is None:
            self._merged_sessions = MergedSessions(self.model_path, slots, self.graph_bytes, saved or [])
        ort = require("onnxruntime", "onnxruntime")
        session = self._merged_sessions.build(self.adapter_arrays(adapter), self.settings.to_session_options(ort),
                                              self._requested, self.settings.disabled_optimizers(self._requested),
                                              attention)
        release_free_memory()
        return MergedAdapter(source=adapter, session=session)
