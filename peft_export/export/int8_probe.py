"""Measure, on calibration text, what int8 does to each weight MatMul of an ONNX graph, and take the few outlier
input channels out of the int8 arithmetic.

Why: a trained encoder's hidden states carry a handful of fixed channels 20-100x larger than the rest (on
all-mpnet-base-v2, channels 461, 555 and 568 of every LayerNorm output reach 45-57 where the median channel peaks
near 1.3; a few FFN units reach 100 after GELU). Dynamic int8 sizes one activation scale per tensor to its largest
value, so those channels set a step of ~0.4 and every ordinary feature (median 0.25) rounds to 0 or one step:
all-linear int8 lands at mean cosine 0.88. Splitting those channels off, ``x @ W = (x * keep) @ W + x[..., idx] @
W[idx]`` with the small second product in fp32, leaves int8 a tensor without outliers (mean cosine 0.997 on the same
model, every weight MatMul still int8). This is LLM.int8()'s decomposition with the outlier channels fixed from
calibration, as they are in these models.

:func:`probe` runs the fp32 graph once over calibration batches with each node's input exposed and records per
node: the per-channel absolute maximum of its input, the outlier channels, and the relative error of ONNX Runtime's
dynamic int8 arithmetic simulated in numpy (uint8 per-tensor activations, int8 per-channel symmetric weights)
after the split. That error orders the int8 ladder: the most sensitive nodes are the first kept in fp32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

# An input channel is an outlier when its calibration maximum exceeds this many times the median channel's.
OUTLIER_FACTOR = 8.0
# At most this share of a node's input channels is split off (beyond it the fp32 side product stops being small).
MAX_OUTLIER_SHARE = 0.02
# Tokens per calibration batch on which each node's int8 error is simulated.
ERROR_TOKENS = 256


@dataclass
class NodeProbe:
    name: str
    op_type: str
    input_name: str
    weight_name: str
    outlier_channels: list[int] = field(default_factory=list)
    input_absmax: float = 0.0
    rest_absmax: float = 0.0  # largest input value once the outlier channels are split off
    relative_error: float = 0.0  # simulated dynamic int8, after the split


def weight_nodes(model, op_types: Iterable[str]) -> list:
    """The nodes of ``op_types`` whose second input (the weight) is a constant initializer."""
    constants = {init.name for init in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in op_types and len(n.input) > 1 and n.input[1] in constants]


def _simulated_error(x: np.ndarray, w: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
    """Squared error and squared norm of ``x[rows] @ w`` under ONNX Runtime's dynamic int8 (uint8 activations, one
    asymmetric scale for the whole tensor ``x``; int8 weights, one symmetric scale per output column)."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = (hi - lo) / 255 or 1.0
    zero = np.round(-lo / scale)
    x = x[rows]
    xq = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    wscale = np.abs(w).max(axis=0) / 127
    wscale[wscale == 0] = 1.0
    wq = np.round(w / wscale) * wscale
    y = x @ w
    return float(((xq @ wq - y) ** 2).sum()), float((y**2).sum())


def probe(model_path: Path, op_types: Iterable[str], batches: list[dict[str, np.ndarray]]) -> tuple[list[NodeProbe],
                                                                                                        float]:
    """One fp32 pass over ``batches`` with every weight node's input exposed; returns the per-node figures (in graph
    order) and the seconds it took."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    start = time.perf_counter()
    model = onnx.load(str(model_path))
    weights = {init.name: init for init in model.graph.initializer}
    nodes = [NodeProbe(n.name, n.op_type, n.input[0], n.input[1]) for n in weight_nodes(model, op_types)]
    inputs = list(dict.fromkeys(p.input_name for p in nodes))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in inputs if name not in known)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    del model
    matrices = {p.name: numpy_helper.to_array(weights[p.weight_name]).astype(np.float32) for p in nodes}
    del weights
    def node_inputs(feeds):  # (tokens, channels) per input, padding dropped
        mask = feeds["attention_mask"].astype(bool)
        # A 3-d input is (batch, sequence, channels); one that is not as long as the mask holds the rows of one
        # token per sequence (a last layer computed for the first token alone, export/first_token_layer.py).
        return {name: v[mask] if v.ndim == 3 and v.shape[1] == mask.shape[1] else v.reshape(-1, v.shape[-1])
                for name, v in zip(inputs, session.run(inputs, feeds))}

    # Pass 1: per-channel maxima of each input.
    channel_max: dict[str, np.ndarray] = {}
    for feeds in batches:
        for name, v in node_inputs(feeds).items():
            channel_max[name] = np.maximum(channel_max.get(name, 0.0), np.abs(v).max(axis=0))
    outliers = {name: outlier_channels(c) for name, c in channel_max.items()}
    for p in nodes:
        # Only a MatMul can be split; a fused Attention (its weights packed inside) keeps every channel.
        idx = outliers[p.input_name] if p.op_type == "MatMul" else np.zeros(0, np.int64)
        c = channel_max[p.input_name]
        p.outlier_channels = [int(i) for i in idx]
        p.input_absmax = float(c.max())
        p.rest_absmax = float(np.delete(c, idx).max()) if len(idx) < len(c) else 0.0
    # Pass 2 (activations are not kept: a base-size model's would take gigabytes): simulated int8 error of each
    # node after the split, on a sample of each batch's tokens (the scale still comes from the whole batch).
    errors = {p.name: [0.0, 0.0] for p in nodes}
    rng = np.random.default_rng(0)
    for feeds in batches:
        values = node_inputs(feeds)
        samples: dict[int, np.ndarray] = {}  # sampled rows per row count (inputs of one token have fewer rows)
        for p in nodes:
            x = values[p.input_name].copy()
            count = len(x)
            if count not in samples:
                samples[count] = np.sort(rng.choice(count, min(count, ERROR_TOKENS), replace=False))
            rows = samples[count]
            x[:, p.outlier_channels] = 0.0
            e, n = _simulated_error(x, matrices[p.name], rows)
            errors[p.name][0] += e
            errors[p.name][1] += n
    for p in nodes:
        err, norm = errors[p.name]
        p.relative_error = float(np.sqrt(err / norm)) if norm > 0 else 0.0
    return nodes, time.perf_counter() - start


def outlier_channels(channel_max: np.ndarray) -> np.ndarray:
    """Indices of the channels whose maximum exceeds :data:`OUTLIER_FACTOR` x the median channel's, largest
    first, at most :data:`MAX_OUTLIER_SHARE` of them."""
    median = float(np.median(channel_max))
    if median <= 0:
        return np.zeros(0, np.int64)
    limit = max(1, int(len(channel_max) * MAX_OUTLIER_SHARE))
    order = np.argsort(-channel_max)[:limit]
    return np.sort(order[channel_max[order] > OUTLIER_FACTOR * median]).astype(np.int64)


def split_outliers(fp32_path: Path, out_path: Path, nodes: list[NodeProbe], external: bool = False) -> list[str]:
    """Write ``fp32_path`` with each MatMul's outlier input channels taken out: ``(x * keep) @ W`` (quantized) plus
    ``x[..., idx] @ W[idx]`` (kept fp32), the masking shared by the nodes that read the same input. Returns the names
    of the fp32 side products, which the quantizer must exclude. The rewritten graph equals the original in fp32 up
    to summation order."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(fp32_path))
    weights = {init.name: init for init in model.graph.initializer}
    split = {p.name: p for p in nodes if p.op_type == "MatMul" and p.outlier_channels}
    masked: dict[str, tuple[str, str]] = {}  # input -> (masked input, gathered outlier channels)
    new_nodes, side = [], []
    for node in model.graph.node:
        probe_ = split.get(node.name)
        if probe_ is None:
            new_nodes.append(node)
            continue
        x, idx = node.input[0], np.asarray(probe_.outlier_channels, np.int64)
        w = numpy_helper.to_array(weights[node.input[1]])
        key = f"{x}|{','.join(map(str, idx))}"
        if key not in masked:
            tag = f"{x}/outlier_split{len(masked)}"
            keep = np.ones(w.shape[0], np.float32)
            keep[idx] = 0.0
            model.graph.initializer.extend([numpy_helper.from_array(keep, tag + "/keep"),
                                            numpy_helper.from_array(idx, tag + "/channels")])
            new_nodes += [helper.make_node("Mul", [x, tag + "/keep"], [tag + "/rest"], name=tag + "/Mul"),
                          helper.make_node("Gather", [x, tag + "/channels"], [tag + "/outliers"], axis=-1,
                                           name=tag + "/Gather")]
            masked[key] = (tag + "/rest", tag + "/outliers")
        rest, gathered = masked[key]
        name = node.name
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[idx]), name + "/outlier_rows"))
        side.append(name + "/outliers_fp32")
        new_nodes += [helper.make_node("MatMul", [rest, node.input[1]], [name + "/int8_part"], name=name),
                      helper.make_node("MatMul", [gathered, name + "/outlier_rows"], [name + "/fp32_part"],
                                       name=side[-1]),
                      helper.make_node("Add", [name + "/int8_part", name + "/fp32_part"], [node.output[0]],
                                       name=name + "/outlier_sum")]
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    onnx.save(model, str(out_path), save_as_external_data=external, location=out_path.name + "_data")
    return side


def sensitivity_order(nodes: list[NodeProbe]) -> list[str]:
    """Node names, most sensitive (largest simulated int8 error) first."""
    return [p.name for p in sorted(nodes, key=lambda p: -p.relative_error)]
