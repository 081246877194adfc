"""OpenVINO backend: one compiled model with explicit precision, performance hint, threads and device.

Same verbs as the ONNX Runtime backend: ``name``, ``input_names``, ``output_names``, ``providers`` (here the
devices that execute), ``run(feeds, adapter=None) -> dict``, plus ``run_batches`` for several batches in parallel
requests, and for switchable IRs the adapter verbs ``lora_input_names``, ``read_adapter``, ``load_adapter``,
``adapter_from_arrays`` and ``adapter_arrays``. A switchable IR takes every LoRA factor as a model input with a
dynamic rank axis; a run sets the adapter's factors and, for the slots it leaves out, rank-0 matrices (an empty
product: the branch adds exactly nothing; B's is a (0, 1) column the Add broadcasts). ``run`` uses the calling
thread's own infer request and sets the LoRA inputs whenever the adapter differs from that request's previous
run; ``run_batches`` gives each request of its queue every input. No request is shared between threads, so
concurrent runs with different adapters cannot see each other's.

Precision is never left to OpenVINO: on CPUs with bf16 units (AVX512_BF16, AMX) OpenVINO would compute in bf16
by default, which moves normalised embeddings by ~1e-3. The default here is the f32 hint (exact parity with the
PyTorch reference); ``precision="bf16"`` is the opt-in for speed.
"""

from __future__ import annotations

import logging
import threading
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, require
from . import openvino_adapters as adapters
from .lora_layout import LORA_A, SAVED_USE, SAVED_VALUE, Slot, is_adapter_input, scale_kind
from .shape_buckets import pad_to_buckets

logger = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16", "f16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
_CAPABILITY_OF_PRECISION = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}


@dataclass
class OpenVinoSettings:
    """How the model is compiled.

    precision: inference precision hint, "f32" (default, parity), "bf16" or "f16" (faster where the device has
        the units; refused on a device that lacks them).
    performance_hint: "LATENCY" (one stream using every core: best for one request at a time) or "THROUGHPUT"
        (several streams; pays off when batches run in parallel: concurrent encode() calls, or one encode()
        call with more than one batch).
    num_threads: INFERENCE_NUM_THREADS on CPU; None lets OpenVINO use every physical core. Set it when several
        models share a process or a machine.
    num_requests: batches run at once by one encode() call; None takes OpenVINO's optimum for the hint.
    dynamic_quantization: CPU dynamic quantization of activations for int8-weight models. None: off under f32
        (exact arithmetic), OpenVINO's default otherwise.
    shape_buckets: pad each batch's sequence length up to a bucket (16, 24, 32, 48, 64, 96, ..., at most
        max_seq_length) and its batch size up to a power of two, so OpenVINO compiles kernels for a few shapes
        instead of one per length (see runtime/shape_buckets.py); results are unchanged (padding is masked and
        cropped). Applies when the backend knows the pad token (models loaded from an export folder). None (the
        default): on for statically quantized IRs (``--quantize int8-static``), whose kernels are slow to compile
        per shape, off otherwise, where the padding costs more than compiling (measured in docs/openvino.md).
    """

    precision: str = "f32"
    performance_hint: str = "LATENCY"
    num_threads: int | None = None
    num_requests: int | None = None
    dynamic_quantization: bool | None = None
    shape_buckets: bool | None = None

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, found {self.precision!r}")
        if str(self.performance_hint).upper() not in PERFORMANCE_HINTS:
            raise ConfigError(
                f"performance_hint must be one of {', '.join(PERFORMANCE_HINTS)}, found {self.performance_hint!r}"
            )
        for name in ("num_threads", "num_requests"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, found {value!r}")

    def device_properties(self, device: str) -> dict[str, Any]:
        """Compile properties for one concrete device (CPU, GPU, GPU.1 ...)."""
        props: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.precision}
        if device.startswith("CPU"):
            if self.num_threads is not None:
                props["INFERENCE_NUM_THREADS"] = self.num_threads
            if self.dynamic_quantization is False or (self.dynamic_quantization is None and self.precision == "f32"):
                props["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
        return props

    def compile_properties(self, device: str) -> dict[str, Any]:
        hint = {"PERFORMANCE_HINT": str(self.performance_hint).upper()}
        if device.startswith("AUTO"):
            # AUTO passes per-device settings on to whichever device it picks.
            return {**hint, "DEVICE_PROPERTIES": {d: self.device_properties(d) for d in ("CPU", "GPU")}}
        if self.num_threads is not None and not device.startswith("CPU"):
            raise ConfigError(f"num_threads applies to the CPU device only, not {device!r}")
        return {**hint, **self.device_properties(device)}


@lru_cache(maxsize=1)
def _core():
    ov = require("openvino", "openvino")
    return ov.Core()


def available_devices() -> list[str]:
    return list(_core().available_devices)


def resolve_device(device: str) -> str:
    """Map a device name to OpenVINO's spelling and refuse devices this machine does not have."""
    name = str(device).strip().upper()
    if name == "CUDA":
        detail = "is an ONNX Runtime device; OpenVINO devices are CPU, GPU and AUTO"
        raise ConfigError(f"device='cuda' {detail}").in_cli_words(f"--device cuda {detail}")
    available = available_devices()
    if name.startswith("AUTO") or name in available or any(d.split(".")[0] == name for d in available):
        return name
    hint = " (an Intel GPU needs its OpenCL driver, libOpenCL.so.1)" if name.startswith("GPU") else ""
    raise ConfigError(
        f"OpenVINO device {device!r} is not available{hint}; available: {', '.join(available + ['AUTO'])}"
    )


def _required_weight_bytes(xml_path: Path) -> int:
    """Bytes of the .bin file that the IR's constants reference (largest offset + size)."""
    needed = 0
    try:
        for _, element in ElementTree.iterparse(str(xml_path), events=("start",)):
            if element.tag == "data" and "offset" in element.attrib and "size" in element.attrib:
                needed = max(needed, int(element.attrib["offset"]) + int(element.attrib["size"]))
    except (ElementTree.ParseError, ValueError) as err:
        raise ConfigError(
            f"{xml_path} is not a valid OpenVINO IR file ({err}); copy it again or re-export the folder"
        ) from err
    return needed


def check_ir_files(xml_path: Path) -> None:
    """An IR is two files; refuse a missing or truncated ``.bin`` before OpenVINO reads it."""
    if not xml_path.is_file():
        raise ConfigError(f"OpenVINO model file not found: {xml_path}")
    bin_path = xml_path.with_suffix(".bin")
    needed = _required_weight_bytes(xml_path)
    if not bin_path.is_file():
        raise ConfigError(
            f"{xml_path.name} has no weights file: {bin_path} is missing. An OpenVINO model is two files; copy "
            f"{bin_path.name} next to {xml_path.name} (the whole export folder), or export it again with "
            "`peft-export merge-openvino`."
        )
    size = bin_path.stat().st_size
    if size < needed:
        raise ConfigError(
            f"{bin_path} is truncated: it has {size} bytes but {xml_path.name} needs {needed}. The copy or "
            "download was incomplete; copy the export folder again or re-export it."
        )


_UNSET = object()  # no adapter selected yet on this thread's request


def _is_lora_input(name: str) -> bool:
    return is_adapter_input(name)


class OpenVinoBackend:
    """A compiled OpenVINO model. ``run`` is thread-safe: every calling thread has its own infer request."""

    name = "openvino"
    adapter_suffix = adapters.ADAPTER_SUFFIX
    can_merge_adapters = False  # adapters always run on the switchable graph

    def __init__(self, model: Path | Any, device: str = "CPU", settings: OpenVinoSettings | None = None,
                 padding: tuple[int, int | None] | None = None):
        """``padding``: (pad token id, max_seq_length) of the model, which shape buckets need."""
        ov = require("openvino", "openvino")
        self.settings = settings or OpenVinoSettings()
        self.settings.check()
        self.device = resolve_device(device)
        core = _core()
        if not isinstance(model, ov.Model):
            model = self._read(core, Path(model))
        buckets = self.settings.shape_buckets
        if buckets is None:  # int8-static IRs carry FakeQuantize operations
            buckets = any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
        self._check_precision_supported(core)
        self.compiled = core.compile_model(model, self.device, self.settings.compile_properties(self.device))
        names = [port.get_any_name() for port in self.compiled.inputs]
        self.input_names = [name for name in names if not _is_lora_input(name)]
        self.lora_input_names = [name for name in names if _is_lora_input(name)]
        self._lora_defaults = self._rank_zero_defaults()
        self._lora_default_tensors = self._tensors(self._lora_defaults)
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]
        self.providers = list(self.compiled.get_property("EXECUTION_DEVICES"))
        if self.device.startswith("AUTO"):
            logger.info("OpenVINO AUTO runs this model on %s", ", ".join(self.providers))
        self.parallel_requests = self.settings.num_requests or int(
            self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        )
        self._local = threading.local()
        self._padding = padding if buckets else None

    def _bucketed(self, feeds: dict[str, np.ndarray]):
        """``feeds`` padded to shape buckets, and what undoes it on the outputs (None: buckets are off)."""
        if self._padding is None:
            return feeds, None
        pad_token_id, max_length = self._padding
        return pad_to_buckets({name: feeds[name] for name in self.input_names}, pad_token_id, max_length)

    @staticmethod
    def _read(core, path: Path):
        if path.suffix == ".onnx":
            from .onnxruntime_backend import check_external_data

            if not path.is_file():
                raise ConfigError(f"ONNX model file not found: {path}")
            try:
                check_external_data(path)
            except ImportError:
                pass  # without the onnx package, external data paths are left to OpenVINO's reader
        else:
            check_ir_files(path)
        try:
            return core.read_model(str(path))
        except RuntimeError as err:
            detail = " ".join(str(err).split())[-300:]
            raise ConfigError(f"OpenVINO cannot read {path}: {detail}") from err

    def _check_precision_supported(self, core) -> None:
        if self.device.startswith("AUTO"):
            return  # the device is picked at compile time; each one applies the hint it supports
        capabilities = core.get_property(self.device, "OPTIMIZATION_CAPABILITIES")
        wanted = _CAPABILITY_OF_PRECISION[self.settings.precision]
        if wanted not in capabilities:
            lacks = f"needs {wanted} support, which {self.device} lacks (it has {', '.join(capabilities)})"
            raise ConfigError(
                f"precision={self.settings.precision!r} {lacks}; use precision='f32'"
            ).in_cli_words(f"--inference-precision {self.settings.precision} {lacks}; use --inference-precision f32")

    def _rank_zero_defaults(self) -> dict[str, np.ndarray]:
        """Rank-0 factors for every LoRA input: (in, 0) for ``lora_A``; for ``lora_B`` (0, 1), a column of zeros
        the Add broadcasts, where the IR leaves B's out axis dynamic (switchable IRs written since that change),
        else (0, out); ones for a scale vector. Also records each input's layer-side size for :meth:`_checked`
        (None: dynamic in the IR)."""
        defaults, self._layer_sizes = {}, {}
        for port in self.compiled.inputs:
            name = port.get_any_name()
            if not _is_lora_input(name):
                continue
            shape = port.get_partial_shape()
            if name.endswith((f".{SAVED_VALUE}", f".{SAVED_USE}")):  # a saved module's copy: the base's by default
                if shape.rank.is_dynamic:
                    raise ConfigError(f"Saved-copy input {name!r} has shape {shape}; export the folder again.")
                value = np.zeros((1,) * shape.rank.get_length(), np.float32)
                value.setflags(write=False)
                defaults[name], self._layer_sizes[name] = value, None
                continue
            if scale_kind(name) is not None:
                if not shape.is_static or len(shape) != 1:
                    raise ConfigError(f"Scale input {name!r} has shape {shape}; a switchable graph takes a vector of "
                                      "fixed length. Export the folder again.")
                size = self._layer_sizes[name] = shape[0].get_length()
                value = np.ones(size, np.float32)
                value.setflags(write=False)
                defaults[name] = value
                continue
            is_a = name.endswith(LORA_A)
            if (shape.rank.is_dynamic or len(shape) != 2 or (is_a and shape[0].is_dynamic)
                    or not shape[1 if is_a else 0].is_dynamic):
                raise ConfigError(
                    f"LoRA input {name!r} has shape {shape}; a switchable graph takes a matrix with a dynamic rank "
                    "axis. Export the folder again with `peft-export merge-openvino BASE --switchable ...`."
                )
            if is_a:
                size = self._layer_sizes[name] = shape[0].get_length()
                value = np.zeros((size, 0), np.float32)
            else:
                size = self._layer_sizes[name] = None if shape[1].is_dynamic else shape[1].get_length()
                value = np.zeros((0, size or 1), np.float32)
            value.setflags(write=False)
            defaults[name] = value
        return defaults

    @staticmethod
    def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """OpenVINO tensors (copies) of ``arrays``, made once and only read by runs."""
        ov = require("openvino", "openvino")
        return {name: ov.Tensor(np.ascontiguousarray(value)) for name, value in arrays.items()}

    def _request(self):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def _inputs(self, feeds: dict[str, np.ndarray], adapter: adapters.OvAdapter | None = None
                ) -> dict[str, Any]:
        """Every input of the model for a request shared by several runs (``run_batches``): the text inputs from
        ``feeds``, then every LoRA input (the adapter's factor, or the rank-0 default), so nothing of an earlier
        run survives in the request."""
        inputs: dict[str, Any] = {name: feeds[name] for name in self.input_names}
        if self._lora_defaults:
            inputs.update(self._lora_default_tensors)
            if adapter is not None:
                inputs.update(adapter.tensors)
        elif adapter is not None:
            raise ConfigError("This OpenVINO model has no LoRA inputs; it cannot run with an adapter")
        return inputs

    def _select_adapter(self, request, adapter: adapters.OvAdapter | None) -> None:
        """Give this thread's request every LoRA input for ``adapter`` (None: rank-0 everywhere), unless its last
        run had the same one. The request belongs to this thread alone, so no other run can see or change what
        is set; skipping 2 x slots ``set_tensor`` calls when the adapter repeats saves ~0.45 ms per batch-1 run
        (72 LoRA inputs, measured)."""
        if self._local.__dict__.get("adapter", _UNSET) is adapter:
            return
        self._local.adapter = _UNSET  # until every input is set: a failure halfway must not look like a match
        for name, tensor in self._lora_default_tensors.items():
            request.set_tensor(name, tensor if adapter is None else adapter.tensors.get(name, tensor))
        self._local.adapter = adapter

    def output_width(self, name: str) -> int | None:
        """The last axis of output ``name`` where the model fixes it (None when it is dynamic or absent)."""
        for port in self.compiled.outputs:
            if name in port.get_names():
                shape = port.get_partial_shape()
                if shape.rank.is_static and shape.rank.get_length() and shape[shape.rank.get_length() - 1].is_static:
                    return int(shape[shape.rank.get_length() - 1].get_length())
        return None

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None,
            adapter: adapters.OvAdapter | None = None) -> dict[str, np.ndarray]:
        """One inference; ``adapter`` (from load_adapter / adapter_from_arrays) is active for this run only."""
        names = outputs or self.output_names
        request = self._request()
        if self._lora_defaults:
            self._select_adapter(request, adapter)
        elif adapter is not None:
            raise ConfigError("This OpenVINO model has no LoRA inputs; it cannot run with an adapter")
        feeds, padding = self._bucketed(feeds)
        results = request.infer({name: feeds[name] for name in self.input_names})  # outputs are copied out
        results = {name: results[name] for name in names}
        return padding.crop(results) if padding is not None else results

    def run_batches(self, batches: list[dict[str, np.ndarray]], outputs: list[str] | None = None,
                    adapter: adapters.OvAdapter | None = None) -> list[dict[str, np.ndarray]]:
        """Run several batches, up to ``parallel_requests`` at once (what the THROUGHPUT hint is for)."""
        if len(batches) <= 1 or self.parallel_requests <= 1:
            return [self.run(feeds, outputs, adapter=adapter) for feeds in batches]
        from openvino import AsyncInferQueue

        names = outputs or self.output_names
        results: list[dict[str, np.ndarray] | None] = [None] * len(batches)
        bucketed = [self._bucketed(feeds) for feeds in batches]

        def collect(request, index: int) -> None:
            values = {name: request.get_tensor(name).data.copy() for name in names}
            padding = bucketed[index][1]
            results[index] = padding.crop(values) if padding is not None else values

        queue = AsyncInferQueue(self.compiled, min(self.parallel_requests, len(batches)))
        queue.set_callback(collect)
        for index, (feeds, _) in enumerate(bucketed):
            queue.start_async(self._inputs(feeds, adapter), userdata=index)
        queue.wait_all()
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"OpenVINO returned no result for batches {missing}")
        return results  # type: ignore[return-value]

    # ----- adapters of switchable graphs -----
    def read_adapter(self, path: Path) -> dict[str, np.ndarray]:
        """The tensors of an adapter file (``.safetensors``; ``.onnx_adapter`` with onnxruntime), by input name."""
        return adapters.read_adapter_arrays(Path(path))

    def load_adapter(self, path: Path, arrays: dict[str, np.ndarray] | None = None) -> adapters.OvAdapter:
        """A handle for runs from ``arrays`` (what :meth:`read_adapter` gave for this file) or the file itself."""
        arrays = self._checked(self.read_adapter(path) if arrays is None else arrays, str(path))
        return adapters.OvAdapter(Path(path), arrays, self._tensors(arrays))

    def adapter_from_arrays(self, arrays: dict[str, np.ndarray]) -> adapters.OvAdapter:
        arrays = self._checked(arrays, "adapter")
        return adapters.OvAdapter(None, arrays, self._tensors(arrays))

    def adapter_arrays(self, adapter: adapters.OvAdapter) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in adapter.arrays.items()}

    def merge_adapter(self, adapter: adapters.OvAdapter, slots: list[Slot],
                      attention: dict[str, int] | None = None, saved: list | None = None) -> adapters.OvAdapter:
        """Not available: OpenVINO runs adapters on the switchable graph (``can_merge_adapters`` is False)."""
        raise ConfigError("merge_adapter needs the ONNX Runtime backend; on OpenVINO adapters always run on the "
                          "switchable graph. Open the export with backend='onnxruntime' to merge adapters.")

    def _checked(self, arrays: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        """Frozen copies of ``arrays``, each a float32 LoRA input of this model with its layer-side size; the full
        checks (pairs, ranks, finite values) are :func:`.lora_layout.check_factor_arrays`, run by the caller."""
        for name, value in arrays.items():
            default = self._lora_defaults.get(name)
            if default is None:
                raise ConfigError(f"{where}: {name!r} is not a LoRA input of this graph")
            if getattr(value, "dtype", None) != np.float32:
                raise ConfigError(f"{where}: {name!r} has dtype {getattr(value, 'dtype', type(value))}, "
                                  "expected float32")
            if name.endswith((f".{SAVED_VALUE}", f".{SAVED_USE}")):
                if value.ndim != default.ndim:
                    raise ConfigError(f"{where}: {name!r} has shape {value.shape}; this graph expects "
                                      f"{default.ndim} axes")
                continue  # the full shape is checked by lora_layout.check_saved_arrays
            if scale_kind(name) is not None:
                if value.shape != default.shape:
                    raise ConfigError(f"{where}: {name!r} has shape {value.shape}; this graph expects {default.shape}")
                continue
            side = 0 if name.endswith(LORA_A) else 1  # the layer's axis; the other is the rank
            size = self._layer_sizes[name]  # None: B's out axis is dynamic; check_factor_arrays checks it
            if value.ndim != 2 or (size is not None and value.shape[side] != size):
                expected = f"({size}, r)" if side == 0 else f"(r, {size or 'out'})"
                raise ConfigError(f"{where}: {name!r} has shape {value.shape}; this graph expects {expected}")
        return adapters.frozen(arrays)

    def describe(self) -> dict[str, Any]:
        """What was asked for and what OpenVINO compiled (devices, precision, streams, threads)."""
        info: dict[str, Any] = {"backend": self.name, "device": self.device, "execution_devices": self.providers,
                                "performance_hint": str(self.settings.performance_hint).upper(),
                                "parallel_requests": self.parallel_requests,
                                "shape_buckets": self._padding is not None}
        for key, prop in (("inference_precision", "INFERENCE_PRECISION_HINT"), ("num_streams", "NUM_STREAMS"),
                          ("num_threads", "INFERENCE_NUM_THREADS")):
            try:
                value = self.compiled.get_property(prop)
            except RuntimeError:  # AUTO does not report device-level properties
                value = None
            info[key] = value.to_string() if hasattr(value, "to_string") else value
        info["num_streams"] = int(info["num_streams"]) if info["num_streams"] is not None else None
        return info
