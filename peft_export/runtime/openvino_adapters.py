"""Adapter weight files for switchable OpenVINO exports (``adapters/NAME.safetensors``): write, read, hold.

OpenVINO has no adapter file format of its own; the LoRA weights of a switchable IR are plain inputs of the
compiled model, fed with every run. A file maps graph input names (``<module>.lora_A`` (in, r),
``<module>.lora_B`` (r, out)) to float32 matrices, in safetensors: no pickle, a checked header, and readable with
the small ``safetensors`` package alone (no onnxruntime, no torch). Loading copies the arrays into memory (an
adapter of MiniLM is 0.6-3.5 MB) and marks them read-only, so every run and every thread shares them safely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, require
from .atomic_file import write_atomically

ADAPTER_SUFFIX = ".safetensors"
_FORMAT = {"format": "peft_export-openvino-lora"}  # safetensors metadata: what the file is


@dataclass(frozen=True)
class OvAdapter:
    """A loaded adapter: where it came from (None when built from arrays), its read-only graph inputs, and the
    same values as OpenVINO tensors, made once: handing a run ready tensors instead of numpy arrays saves a
    conversion per input per run (measured: about 1.3 ms of a 3.9 ms batch-1 run with 72 LoRA inputs)."""

    path: Path | None
    arrays: dict[str, np.ndarray]
    tensors: dict[str, object] = field(repr=False, default_factory=dict)  # name -> openvino.Tensor


def frozen(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """C-contiguous float32 copies that cannot be written to (shared by every run of every thread)."""
    out = {}
    for name, value in arrays.items():
        copy = np.array(value, dtype=np.float32, order="C", copy=True)
        copy.setflags(write=False)
        out[name] = copy
    return out


def write_adapter_file(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` (graph input name -> float32 matrix) as safetensors, via a temporary file and a rename so
    that a reader never sees half a file."""
    require("safetensors", "openvino")
    from safetensors.numpy import save_file

    tensors = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in arrays.items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=_FORMAT))


def read_adapter_arrays(path: Path) -> dict[str, np.ndarray]:
    """The tensors of an adapter file as numpy arrays; a file that is not safetensors is refused clearly.

    An ONNX Runtime adapter file (``.onnx_adapter``, from a switchable ONNX export) is read with onnxruntime when
    it is installed: the tensors are the same graph inputs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Adapter file not found: {path}")
    if path.suffix == ".onnx_adapter":
        from .onnxruntime_adapters import read_adapter_arrays as read_onnx_adapter

        return read_onnx_adapter(path)
    require("safetensors", "openvino")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise ConfigError(
            f"{path} is not a valid adapter file (safetensors, graph input name -> float32 matrix): "
            f"{str(err).splitlines()[0][-160:] if str(err) else type(err).__name__}"
        ) from err
