"""ONNX Runtime's LoRA adapter files (``.onnx_adapter``): write, read, load, and activate for one run.

An adapter file maps graph input names to tensors; a run with the adapter active (``RunOptions.
add_active_adapter``) feeds those tensors in place of the inputs' defaults. The file is memory-mapped when
loaded, so a process holding many adapters pays for their size once, in the page cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, require
from .atomic_file import write_atomically

ADAPTER_SUFFIX = ".onnx_adapter"


@dataclass(frozen=True)
class OrtAdapter:
    """A loaded adapter: the file it was mapped from, ONNX Runtime's handle to it, and the arrays read when it was
    loaded (merge_adapter and get_adapter_state_dict use those, never the file again, which a later export may
    have replaced)."""

    path: Path
    handle: object  # onnxruntime.LoraAdapter
    arrays: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)


def write_adapter_file(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` (graph input name -> float32 matrix) as an ONNX Runtime adapter file, via a temporary
    file and a rename so that a reader never sees half a file."""
    ort = require("onnxruntime", "onnxruntime")
    values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype=np.float32))
              for name, a in arrays.items()}
    adapter = ort.AdapterFormat()
    adapter.set_parameters(values)
    write_atomically(path, adapter.export_adapter)


def read_adapter_arrays(path: Path) -> dict[str, np.ndarray]:
    """The tensors of an adapter file as numpy arrays (copies); a file that is not one is refused clearly."""
    ort = require("onnxruntime", "onnxruntime")
    if not path.is_file():
        raise ConfigError(f"Adapter file not found: {path}")
    try:
        parameters = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except RuntimeError as err:
        raise ConfigError(
            f"{path} is not a valid ONNX Runtime adapter file (.onnx_adapter): {str(err).splitlines()[0][-160:]}"
        ) from err
    return {name: np.array(value.numpy()) for name, value in parameters.items()}


def load_adapter_file(path: Path, arrays: dict[str, np.ndarray] | None = None) -> OrtAdapter:
    """Memory-map an adapter file for runs; check its contents first with :func:`read_adapter_arrays` and pass
    what it returned as ``arrays`` (kept with the handle)."""
    ort = require("onnxruntime", "onnxruntime")
    handle = ort.LoraAdapter()
    try:
        handle.Load(str(path))
    except RuntimeError as err:
        raise ConfigError(f"{path} could not be loaded as an ONNX Runtime adapter: {str(err).splitlines()[0]}") from err
    return OrtAdapter(Path(path), handle, arrays)


def run_options(adapter: OrtAdapter | None):
    """Fresh RunOptions for one run, with ``adapter`` active: nothing is shared between concurrent runs."""
    ort = require("onnxruntime", "onnxruntime")
    options = ort.RunOptions()
    if adapter is not None:
        options.add_active_adapter(adapter.handle)
    return options
