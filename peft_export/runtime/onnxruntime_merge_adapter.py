"""Adapters merged into their own ONNX Runtime session (``EmbeddingModel.merge_adapter``): speed of a merged export
for the adapters a server calls most, without re-exporting.

A switchable graph pays for its LoRA branches on every call: each targeted Linear runs two small products and an
Add, and on a 6-layer MiniLM at batch 1 that is ONNX Runtime's per-node cost more than arithmetic (about +8%
with every branch at rank 0, +13 to +22% with an adapter; ``benchmarks/bench_switchable.py``). No arrangement of
the branches inside the graph removes those nodes, so a merged adapter runs a *different* graph: the switchable
graph with its branches cut out (the base graph exactly), with ``W + A @ B`` in place of ``W`` at each slot the
adapter targets. That is what the merged export of the adapter computes, at the same cost.

Memory: every weight the adapter leaves alone is one shared copy across all merged sessions (handed to ONNX
Runtime with ``SessionOptions.add_initializer``); the merged matrices are embedded in the session's own graph, so
ONNX Runtime frees them once it has pre-packed them. A merged adapter then costs ONNX Runtime's pre-packed copy
of the MatMul weights (about 50 MB for all-MiniLM-L6-v2; the Python API cannot share pre-packed weights between
sessions), against about 107 MB for a separate merged model and a few MB for an adapter on the switchable graph.
The first merge also keeps one shared copy of the base weights. Those separate weights are also why calls that
rotate between merged adapters at batch 1 are slower than calls that stay on one (CPU caches).

Cutting the branches out needs the ``onnx`` package (part of the export extra), read lazily: serving without
merged adapters does not need it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError, require
from .lora_layout import SavedParam, Slot
from ..methods.branch import SCALE_IN, SCALE_OUT, SCALE_POST

logger = logging.getLogger(__name__)

SHARED_MIN_ELEMENTS = 1024  # smaller initializers (biases, LayerNorm, shape constants) stay in each graph


@dataclass(frozen=True)
class MergedAdapter:
    """A backend adapter handle whose runs go to a session with the adapter merged into the weights."""

    source: object  # the switchable handle it was merged from (kept for get_adapter_state_dict and unmerge)
    session: object  # onnxruntime.InferenceSession


def cut_branches(model, slots: list[Slot]) -> dict[str, str]:
    """Remove every LoRA branch from the switchable ``model`` (an ``onnx.ModelProto``, edited in place), leaving the
    base graph; return each slot's base weight initializer name (layout (in, out): the graph computes ``x @ W``).

    A branch is ``MatMul(x, <module>.lora_A) -> MatMul(., <module>.lora_B) -> Add(x @ W, .)``; its Add becomes an
    Identity of ``x @ W``, which ONNX Runtime removes when it loads the graph.
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights, dropped = {}, set()
    for slot in slots:
        a_nodes = [n for n in consumers.get(slot.input_a, []) if n.op_type == "MatMul"]
        b_nodes = [n for n in consumers.get(slot.input_b, []) if n.op_type == "MatMul"]
        if len(a_nodes) != 1 or len(b_nodes) != 1:
            raise ConfigError(f"The switchable graph has no single LoRA branch for {slot.module!r}; export it again")
        a_node, b_node = a_nodes[0], b_nodes[0]
        adds = [n for n in consumers.get(b_node.output[0], []) if n.op_type == "Add"]
        if len(adds) != 1 or b_node.input[0] != a_node.output[0]:
            raise ConfigError(f"The LoRA branch of {slot.module!r} is not x @ A @ B added to x @ W; export it again")
        add = adds[0]
        base_output = next(name for name in add.input if name != b_node.output[0])
        base = producers.get(base_output)
        if base is None or base.op_type != "MatMul" or base.input[1] not in initializers:
            raise ConfigError(f"The base projection of {slot.module!r} is not a MatMul with a constant weight")
        weights[slot.module] = base.input[1]
        dropped |= {id(a_node), id(b_node)}
        add.op_type = "Identity"
        del add.input[:]
        add.input.append(base_output)
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    lora_names = {name for slot in slots for name in (slot.input_a, slot.input_b)}
    _drop_inputs(graph, lora_names)
    return weights


def _drop_inputs(graph, names: set[str]) -> None:
    for field in (graph.input, graph.initializer):
        kept_items = [item for item in field if item.name not in names]
        del field[:]
        field.extend(kept_items)


def cut_scales(model, slots: list[Slot]) -> dict[str, str | None]:
    """Remove every scale vector (``methods/branch.py``) from ``model`` (after :func:`cut_branches`): each ``Mul``
    by a scale input becomes an Identity of its other input. Returns, for each slot with a ``lora_scale_post``,
    the name of its bias initializer (None when the layer has no bias), which that scale multiplies too."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    biases: dict[str, str | None] = {}
    for slot in slots:
        for kind in slot.scales:
            name = slot.scale_input(kind)
            muls = [n for n in consumers.get(name, []) if n.op_type == "Mul"]
            if len(muls) != 1 or len(consumers.get(name, [])) != 1:
                raise ConfigError(f"The switchable graph has no single scale product for {name!r}; export it again")
            mul = muls[0]
            data = next(i for i in mul.input if i != name)
            if kind == SCALE_POST:
                add = producers.get(data)
                bias = [i for i in add.input if i in initializers] if add is not None and add.op_type == "Add" else []
                biases[slot.module] = bias[0] if len(bias) == 1 else None
            mul.op_type = "Identity"
            del mul.input[:]
            mul.input.append(data)
    _drop_inputs(graph, {slot.scale_input(kind) for slot in slots for kind in slot.scales})
    return biases


def cut_saved(model, saved: list[SavedParam], factors: dict[str, np.ndarray]) -> set[str]:
    """Replace each saved parameter's ``Where(saved_use > 0.5, saved_value, base)`` in ``model`` by the adapter's
    copy (embedded as an initializer named like the input) where ``factors`` has one, else by the base value.
    Returns the initializers these now read (base and copies), which must stay embedded in the graph: the graph
    transposes them at run time, and ONNX Runtime does not fold that transpose for a value handed over with
    ``add_initializer``."""
    from onnx import numpy_helper

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dropped, read = set(), set()
    for param in saved:
        wheres = [n for n in consumers.get(param.input_value, []) if n.op_type == "Where"]
        uses = consumers.get(param.input_use, [])
        if len(wheres) != 1 or len(uses) != 1:
            raise ConfigError(f"The switchable graph has no single saved-copy choice for {param.name!r}; export it "
                              "again")
        where, use = wheres[0], uses[0]
        chosen = param.input_value if param.input_value in factors else where.input[2]
        source = producers.get(chosen)
        while source is not None and source.op_type == "Identity":  # the exporter shares equal initializers
            chosen_base = source.input[0]
            source = producers.get(chosen_base)
            read.add(chosen_base)
        read.add(chosen)
        where.op_type = "Identity"
        del where.input[:]
        where.input.append(chosen)
        dropped.add(id(use))
        threshold = producers.get(use.input[1])
        if threshold is not None and threshold.op_type == "Constant" and len(consumers[use.input[1]]) == 1:
            dropped.add(id(threshold))
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    _drop_inputs(graph, {n for param in saved for n in (param.input_value, param.input_use)})
    graph.initializer.extend(
        numpy_helper.from_array(np.ascontiguousarray(factors[param.input_value], dtype=np.float32), param.input_value)
        for param in saved if param.input_value in factors)
    return read


def folded_weights(base: np.ndarray, factors: dict[str, np.ndarray], slot: Slot) -> np.ndarray | None:
    """The weight (in, out) the adapter's ``factors`` (graph input name -> array) give ``slot``, in float64, or
    None when the adapter leaves the slot alone: ``diag(in) (W + A @ B) diag(out * post)`` (methods/branch.py)."""
    lora_a, lora_b = factors.get(slot.input_a), factors.get(slot.input_b)
    scales = {kind: factors[slot.scale_input(kind)].astype(np.float64) for kind in slot.scales
              if slot.scale_input(kind) in factors}
    has_branch = lora_a is not None and lora_a.shape[1] > 0
    if not has_branch and not scales:
        return None
    weight = base.astype(np.float64)
    if has_branch:
        weight = weight + lora_a.astype(np.float64) @ lora_b.astype(np.float64)
    if SCALE_IN in scales:
        weight = scales[SCALE_IN][:, None] * weight  # (in, 1) * (in, out)
    for kind in (SCALE_OUT, SCALE_POST):
        if kind in scales:
            weight = weight * scales[kind][None, :]  # (in, out) * (1, out)
    return weight


class MergedSessions:
    """Builds one session per merged adapter from a switchable ONNX file, sharing the untouched base weights."""

    def __init__(self, model_path: Path, slots: list[Slot], read_graph: Callable[[], bytes] | None = None,
                 saved: list[SavedParam] = ()):
        self.model_path = model_path
        self.slots = slots
        self.saved = list(saved)
        # The graph's bytes as the switchable session loaded them (see OnnxRuntimeBackend.graph_bytes), so that a
        # file replaced on disk since (an export --force) is never merged with this model's adapters.
        self.read_graph = read_graph or model_path.read_bytes
        self._lock = threading.Lock()
        self._shared: dict[str, object] = {}  # initializer name -> OrtValue, one copy for every merged session
        self._arrays: dict[str, np.ndarray] = {}  # the memory those OrtValues borrow

    def build(self, factors: dict[str, np.ndarray], options, providers: list,
              disabled_optimizers: list[str] | None = None, attention: dict[str, int] | None = None):
        """A session for the base with ``factors`` (graph input name -> A (in, r) / B (r, out), scaling folded in;
        scale vectors) merged: ``W + A @ B`` at every slot the adapter targets, with its scales folded in
        (:func:`folded_weights`; products in float64, rounded once). The fold rule is the graph's arithmetic, read
        from the adapter's tensors: no method module is involved.

        ``attention`` (``{"num_heads", "hidden_size"}``, recorded by the export) fuses each attention block as
        merge-onnx does for a merged export (``runtime/onnxruntime_fusion.py``), so the merged adapter runs the same
        graph
        as the merged export of that adapter; without it the graph stays as traced."""
        onnx = require("onnx", "export")  # the onnx package; the export extra has it
        from onnx import numpy_helper

        ort = require("onnxruntime", "onnxruntime")
        with self._lock:
            # ONNX Runtime wants every initializer's data in the graph bytes, even those add_initializer replaces,
            # so the graph is read again for each merge rather than kept (it is as large as the weights).
            model = onnx.load_model_from_string(self.read_graph())
            if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
                from onnx.external_data_helper import load_external_data_for_model

                load_external_data_for_model(model, str(self.model_path.parent))
            weights = cut_branches(model, self.slots)
            biases = cut_scales(model, self.slots)
            unshared = cut_saved(model, self.saved, factors)
            if not self._shared:
                for tensor in model.graph.initializer:
                    if int(np.prod(tensor.dims)) >= SHARED_MIN_ELEMENTS:
                        array = np.ascontiguousarray(numpy_helper.to_array(tensor))
                        self._arrays[tensor.name] = array
                        self._shared[tensor.name] = ort.OrtValue.ortvalue_from_numpy(array)
            merged = {}
            small = {t.name: t for t in model.graph.initializer if t.name not in self._arrays}  # not shared
            def base_of(name: str) -> np.ndarray:
                return self._arrays[name] if name in self._arrays else numpy_helper.to_array(small[name])

            for slot in self.slots:
                name = weights[slot.module]
                with np.errstate(over="ignore", invalid="ignore"):  # checked right below
                    weight = folded_weights(base_of(name), factors, slot)
                    if weight is None:
                        continue  # the adapter leaves this slot alone
                    merged[name] = weight.astype(np.float32)
                    post, bias = factors.get(slot.scale_input(SCALE_POST)), biases.get(slot.module)
                    if post is not None and bias is not None:  # the scale after the bias scales the bias too
                        merged[bias] = (base_of(bias).astype(np.float64) * post).astype(np.float32)
                if not np.isfinite(merged[name]).all() or (bias in merged and not np.isfinite(merged[bias]).all()):
                    raise ConfigError(f"Merging the adapter into {slot.module!r} gives non-finite weights; refused")
            for tensor in model.graph.initializer:
                if tensor.name in merged:  # embedded: ONNX Runtime frees it after pre-packing
                    tensor.CopyFrom(numpy_helper.from_array(merged[tensor.name], tensor.name))
            if attention:
                model = _fuse_attention(model, attention)
            in_graph = {tensor.name for tensor in model.graph.initializer}
            # From a file, not from bytes: the Python session object would keep the bytes (a whole model) alive.
            data = model.SerializeToString()
            del model
            fd, scratch = tempfile.mkstemp(suffix=".onnx", prefix="peft-export-merged-")
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
            except OSError as err:
                os.unlink(scratch)
                raise ConfigError(f"merge_adapter writes the merged graph ({len(data) / 1e6:.0f} MB) to a temporary "
                                  f"file in {tempfile.gettempdir()} for a moment and could not: {err}. Free space "
                                  "there or point TMPDIR elsewhere.") from err
            del data
        try:
            for name, value in self._shared.items():
                if name not in merged and name in in_graph and name not in unshared:  # fused q/k/v: packed anew
                    options.add_initializer(name, value)
            return ort.InferenceSession(scratch, sess_options=options, providers=providers,
                                        disabled_optimizers=disabled_optimizers)
        finally:
            os.unlink(scratch)


def _fuse_attention(model, attention: dict[str, int]):
    """The merged graph with attention fused as in a merged export, or as it was if nothing fused or the optimizer
    failed (the unfused graph computes the same, a little slower)."""
    from .onnxruntime_fusion import AttentionShape, fuse_attention, fused_blocks

    try:
        shape = AttentionShape(int(attention["num_heads"]), int(attention["hidden_size"]))
        # Exports made before the rewrite recorded the shape only for families the BERT optimizer fuses.
        fused, counts = fuse_attention(model, shape, bert_optimizer=bool(attention.get("bert_optimizer", True)))
    except Exception as err:  # a third-party optimizer; the unfused graph is valid without it
        logger.warning("merge_adapter: attention fusion failed (%s: %s); the merged graph runs unfused",
                       type(err).__name__, err)
        return model
    return fused if fused_blocks(counts) else model


def release_free_memory() -> None:
    """Hand the heap that reading and writing the graph left free back to the system (glibc's ``malloc_trim``).

    Called after a merge, once its buffers are dropped. Measured on all-MiniLM-L6-v2: without it a merge leaves
    the process ~200 MB larger than the ~45 MB the new session holds. Elsewhere (no glibc) this does nothing."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass
