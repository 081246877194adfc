"""ONNX external data for models over protobuf's 2 GiB: one data file per graph, written by streaming.

torch.onnx writes a graph over 2 GiB as ``model.onnx`` plus one file per weight tensor, named after the tensor
(about 150 files for a 300M-parameter encoder). :func:`pack_external_data` rewrites such a graph (or one with its
weights inline) into ``model.onnx`` + one ``model.onnx_data`` with a fixed relative name, copying each tensor's
bytes through a small buffer: the weights are never all in memory at once, unlike ``onnx.load`` + ``onnx.save``,
which hold the whole model as a protobuf. Only the files the new graph references are written; the caller removes
the source folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

ALIGNMENT = 4096  # each tensor starts on a page boundary, so ONNX Runtime can map it without copying
SIZE_THRESHOLD = 1024  # tensors smaller than this (shapes, scalars) stay inside the graph file
_CHUNK = 16 * 1024 * 1024


def graph_tensors(graph) -> Iterator:
    """Every TensorProto of ``graph``: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from graph_tensors(subgraph)


def _external_entries(tensor) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def uses_external_data(model_path: Path) -> bool:
    """Whether the ONNX file at ``model_path`` keeps any tensor outside itself."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph_tensors(model.graph))


def external_files(model_path: Path) -> list[str]:
    """The relative names of the data files the graph at ``model_path`` references, sorted."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return sorted({_external_entries(t)["location"] for t in graph_tensors(model.graph)
                   if t.data_location == onnx.TensorProto.EXTERNAL})


def pack_external_data(source: Path, target: Path, data_name: str) -> int:
    """Write the graph at ``source`` as ``target`` + ``target.parent / data_name`` holding every tensor of at
    least SIZE_THRESHOLD bytes, whether ``source`` had it inline or in its own external files; return the data
    file's size. ``source`` and its data files are read, not changed."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    data_path = target.parent / data_name
    with open(data_path, "wb") as out:
        for tensor in graph_tensors(model.graph):
            external = tensor.data_location == onnx.TensorProto.EXTERNAL
            if not external and len(tensor.raw_data) < SIZE_THRESHOLD:
                continue
            offset = -out.tell() % ALIGNMENT
            out.write(b"\0" * offset)
            start = out.tell()
            if external:
                entries = _external_entries(tensor)
                with open(source.parent / entries["location"], "rb") as src:
                    src.seek(int(entries.get("offset", 0)))
                    _copy(src, out, int(entries["length"]) if "length" in entries else None)
            else:
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            length = out.tell() - start
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(start)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
        size = out.tell()
    onnx.save_model(model, str(target))
    return size


def _copy(src, out, length: int | None) -> None:
    if length is None:
        shutil.copyfileobj(src, out, _CHUNK)
        return
    while length > 0:
        chunk = src.read(min(_CHUNK, length))
        if not chunk:
            raise OSError(f"external data file {src.name} ends {length} bytes early")
        out.write(chunk)
        length -= len(chunk)
