"""How close two measured paths are to what this machine can do at all (issue 23's batch-1 targets, issue 25's bf16
target): the memory read bandwidth, the weight bytes a batch-1 query must stream, and the per-token cost of two
OpenVINO IRs at the same input shape.

    python benchmarks/investigations/bench_bounds.py bandwidth
    python benchmarks/investigations/bench_bounds.py weights GRAPH_OR_DIR [GRAPH_OR_DIR ...]
    python benchmarks/investigations/bench_bounds.py per-token IR_XML IR_XML --precision bf16 --shape 32x128
    python benchmarks/investigations/bench_bounds.py padding --texts TEXTS_JSON --export RERANKER_EXPORT
    python benchmarks/investigations/bench_bounds.py linears GRAPH_OR_DIR --rows 15 --rows 512
    python benchmarks/investigations/bench_bounds.py nodes IR_XML [IR_XML ...] --precision bf16 --shape 1x16

``bandwidth``: GB/s of summing a 1 GiB float32 array split over the cores (threads; numpy releases the GIL), best of
five. ``weights``: bytes of an ONNX export's initializers that every query reads (those only gathered from, the
token embedding tables, are left out), and that over the bandwidth = the least time a batch-1 query can take when
the weights do not fit in cache. ``per-token``: p50 of 10 runs at one shape per IR, alternating, in microseconds per
token. ``padding``: real and padded tokens of a rerank request under peft_export's batch plan and under
sentence-transformers' (sorted by length, batches of 32). ``linears``: only the dense products of an ONNX export
(every 2-D weight that is not a gathered table, chained ``x[rows, in] @ W1 @ W2 ...``), timed with each engine this
machine has: ONNX Runtime fp32 and dynamic int8 (per channel, as the export's int8 uses), OpenVINO f32 and bf16, and
torch's ``linear`` (oneDNN). At ``rows`` = a batch-1 query's tokens this is the least time any of these engines
takes for the model's matrix work alone, with nothing else of the model run. ``nodes``: OpenVINO IRs at batch B
and length L, compiled as exported (dynamic shapes) and reshaped to the static shape [B, L], alternating rounds of
calls whose real lengths cycle through L-2, L-1 and L (the static one padded to L, as shape buckets would); then the
static compiles' own per-node time (OpenVINO's PERF_COUNT), summed by node type: how much of a call the model's
FullyConnected nodes take inside the model itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from peft_export.bench.rounds import alternating_rounds
from peft_export.bench.timing import timed_calls


def _ir_inputs(compiled, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """An encoder IR's inputs by name: the token ids, the attention mask, zeros for token types."""
    return {n: ids if "input_ids" in n else mask if "mask" in n else np.zeros_like(ids)
            for n in (port.get_any_name() for port in compiled.inputs)}


def bandwidth(args) -> None:
    threads = args.threads or os.cpu_count() or 1
    data = np.ones(256 * 1024 * 1024, dtype=np.float32)  # 1 GiB
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    print(json.dumps({"threads": threads, "read_GB_per_s": round(data.nbytes / best / 1e9, 2)}))


def weights(args) -> None:
    import onnx

    for given in map(Path, args.exports):  # an .onnx file, or a folder holding one
        path = given if given.is_file() else sorted(given.glob("*.onnx"))[0]
        folder = path.parent
        model = onnx.load(str(path))
        gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
        used_otherwise = {i for n in model.graph.node if n.op_type != "Gather" for i in n.input}
        total = streamed = 0
        for init in model.graph.initializer:
            size = onnx.numpy_helper.to_array(init, base_dir=str(folder)).nbytes
            total += size
            if not (init.name in gathered and init.name not in used_otherwise):
                streamed += size
        print(json.dumps({"graph": str(path), "weight_bytes": total, "streamed_per_query_bytes": streamed}))


def per_token(args) -> None:
    import openvino as ov

    core = ov.Core()
    batch, length = (int(x) for x in args.shape.split("x"))
    compiled = [core.compile_model(core.read_model(xml), "CPU", {"INFERENCE_PRECISION_HINT": args.precision})
                for xml in args.irs]
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, (batch, length))
    requests = {xml: (c.create_infer_request(), _ir_inputs(c, ids, np.ones_like(ids)))
                for xml, c in zip(args.irs, compiled)}
    times = alternating_rounds(list(requests), args.rounds,
                               lambda xml: timed_calls(lambda: requests[xml][0].infer(requests[xml][1]), 10))
    for xml, rounds in times.items():
        p50 = statistics.median(itertools.chain.from_iterable(rounds))
        print(json.dumps({"ir": xml, "shape": args.shape, "p50_ms": round(p50 * 1e3, 2),
                          "us_per_token": round(p50 * 1e6 / (batch * length), 2)}))


def padding(args) -> None:
    from peft_export import CrossEncoderModel
    from peft_export.runtime.batches import plan_batches

    texts = json.loads(Path(args.texts).read_text())
    model = CrossEncoderModel(args.export)
    lengths = [len(e.ids) for e in model._tokenizer.tokenize_pairs([(texts["query"], p) for p in texts["passages"]])]
    ours = plan_batches(lengths, 32, model.max_batch_tokens)
    ranked = sorted(lengths, reverse=True)  # sentence-transformers: sorted by length, batches of 32
    theirs = [ranked[i:i + 32] for i in range(0, len(ranked), 32)]
    print(json.dumps({"pairs": len(lengths), "real_tokens": sum(lengths),
                      "padded_ours": int(sum(len(b) * max(lengths[i] for i in b) for b in ours)),
                      "batches_ours": [len(b) for b in ours],
                      "padded_sentence_transformers": sum(len(b) * b[0] for b in theirs)}))


def _linear_graph(path: Path, rows: int, folder: Path):
    """(ONNX model with one MatMul per dense weight of ``path``, its feeds, the weights, multiply-adds per pass)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    used_otherwise = {i for n in model.graph.node if n.op_type != "Gather" for i in n.input}
    mats = [numpy_helper.to_array(init, base_dir=str(folder)) for init in model.graph.initializer
            if len(init.dims) == 2 and min(init.dims) >= 64 and init.data_type == TensorProto.FLOAT
            and not (init.name in gathered and init.name not in used_otherwise)]
    # One chain x @ W1 @ W2 ... in an order where each product's width feeds the next (a transformer's weights
    # always allow it: as many 768->3072 as 3072->768), so the pass writes one small output and reads each weight
    # once, as the model does; a weight that fits nowhere gets its own input and output.
    chain: list[int] = []
    unused = list(range(len(mats)))
    width = max((m.shape[0] for m in mats), key=lambda k: sum(m.shape[0] == k for m in mats))
    while unused:
        fits = [i for i in unused if mats[i].shape[0] == width]
        if not fits:
            break
        square = [i for i in fits if mats[i].shape[1] == width]
        leaving = [i for i in fits if mats[i].shape[1] != width]
        # take a width-changing product when the way back exists, else a square one
        back = [i for i in leaving if any(mats[j].shape == mats[i].shape[::-1] for j in unused if j != i)]
        pick = (back or square or leaving)[0]
        chain.append(pick)
        unused.remove(pick)
        width = mats[pick].shape[1]
    nodes, inits, outputs, inputs = [], [], [], []
    start = mats[chain[0]].shape[0]
    inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, start]))
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((rows, start)).astype(np.float32)}
    current = "x"
    for step, i in enumerate(chain):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(mats[i]), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{step}"]))
        current = f"h{step}"
    outputs.append(helper.make_tensor_value_info(current, TensorProto.FLOAT, [rows, width]))
    for i in unused:
        w = mats[i]
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w), f"w{i}"))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [rows, w.shape[0]]))
        feeds[f"x{i}"] = rng.standard_normal((rows, w.shape[0])).astype(np.float32)
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, w.shape[1]]))
    graph = helper.make_graph(nodes, "linears", inputs, outputs, inits)
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return built, feeds, mats, rows * sum(w.size for w in mats)


def linears(args) -> None:
    """Time the model's dense products alone with each engine, at each ``--rows``."""
    import tempfile

    import onnxruntime as ort

    given = Path(args.export)
    path = given if given.is_file() else sorted(given.glob("*.onnx"))[0]
    threads = args.threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            built, feeds, mats, macs = _linear_graph(path, rows, path.parent)
            fp32 = Path(tmp, f"fp32-{rows}.onnx")
            import onnx

            onnx.save(built, str(fp32))
            engines = {}
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            session = ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"])
            engines["onnxruntime fp32"] = lambda s=session: s.run(None, feeds)
            from onnxruntime.quantization import QuantType, quantize_dynamic

            int8 = Path(tmp, f"int8-{rows}.onnx")
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
            qsession = ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])
            engines["onnxruntime int8 (dynamic, per channel)"] = lambda s=qsession: s.run(None, feeds)
            try:
                import openvino as ov

                core = ov.Core()
                for precision in ("f32", "bf16"):
                    compiled = core.compile_model(core.read_model(str(fp32)), "CPU",
                                                  {"INFERENCE_PRECISION_HINT": precision,
                                                   "PERFORMANCE_HINT": "LATENCY"})
                    request = compiled.create_infer_request()
                    engines[f"openvino {precision}"] = lambda r=request: r.infer(feeds)
            except ImportError:
                pass
            try:
                import torch

                torch.set_num_threads(threads)
                weights = [torch.from_numpy(np.ascontiguousarray(w.T)) for w in mats]
                first = torch.from_numpy(feeds["x"])
                others = {i: torch.from_numpy(feeds[f"x{i}"]) for i in range(len(mats)) if f"x{i}" in feeds}
                order = [int(n.input[1][1:]) for n in built.graph.node if n.input[0] != f"x{n.input[1][1:]}"]

                def run_torch():
                    with torch.inference_mode():
                        h = first
                        for i in order:
                            h = torch.nn.functional.linear(h, weights[i])
                        return [h] + [torch.nn.functional.linear(x, weights[i]) for i, x in others.items()]
                engines["torch fp32 (oneDNN)"] = run_torch
            except ImportError:
                pass
            times = alternating_rounds(list(engines), args.rounds, lambda name: timed_calls(engines[name], args.runs))
            for name, rounds in times.items():
                p50 = statistics.median(itertools.chain.from_iterable(rounds))
                print(json.dumps({"graph": str(path), "rows": rows, "engine": name, "weights": len(mats),
                                  "chained": len(mats) - sum(1 for k in feeds if k != "x"),
                                  "p50_ms": round(p50 * 1e3, 2),
                                  "gflop_per_s": round(2 * macs / p50 / 1e9, 1)}), flush=True)


def nodes(args) -> None:
    import collections

    import openvino as ov

    core = ov.Core()
    batch, length = (int(x) for x in args.shape.split("x"))
    props = {"INFERENCE_PRECISION_HINT": args.precision, "PERFORMANCE_HINT": "LATENCY"}
    reals = [length - 2, length - 1, length]
    rng = np.random.default_rng(0)

    def static_model(ir: str):
        model = core.read_model(ir)
        model.reshape({port.get_any_name(): ov.PartialShape([batch, length]) for port in model.inputs})
        return model

    def feeds(compiled, real: int, padded: int) -> dict[str, np.ndarray]:
        ids = np.zeros((batch, padded), dtype=np.int64)
        ids[:, :real] = rng.integers(1000, 2000, (batch, real))
        return _ir_inputs(compiled, ids, (ids != 0).astype(np.int64))

    def cycling(compiled, inputs: list[dict[str, np.ndarray]]) -> Callable[[], Any]:
        """One infer request whose calls cycle through ``inputs``."""
        request, each = compiled.create_infer_request(), itertools.cycle(inputs)
        return lambda: request.infer(next(each))

    contenders: dict[tuple[str, str], Callable[[], Any]] = {}
    static_inputs = {}
    for ir in args.irs:
        dynamic = core.compile_model(core.read_model(ir), "CPU", props)
        static = core.compile_model(static_model(ir), "CPU", props)
        static_inputs[ir] = [feeds(static, r, length) for r in reals]
        contenders[ir, "dynamic"] = cycling(dynamic, [feeds(dynamic, r, r) for r in reals])
        contenders[ir, "static"] = cycling(static, static_inputs[ir])
    times = alternating_rounds(list(contenders), args.rounds,
                               lambda key: statistics.median(timed_calls(contenders[key], args.runs, len(reals))))
    for (ir, mode), rounds in times.items():
        print(json.dumps({"ir": ir, "mode": mode, "shape": args.shape, "lengths": reals,
                          "p50_ms": round(statistics.median(rounds) * 1e3, 2),
                          "rounds_ms": [round(t * 1e3, 2) for t in rounds]}), flush=True)
    for ir in args.irs:  # where a static call's time goes, by node type (PERF_COUNT slows a call a little)
        request = core.compile_model(static_model(ir), "CPU", {**props, "PERF_COUNT": True}).create_infer_request()
        for f in static_inputs[ir]:
            request.infer(f)
        by_type: collections.Counter = collections.Counter()
        for f in itertools.islice(itertools.cycle(static_inputs[ir]), args.runs):
            request.infer(f)
            for node in request.profiling_info:
                by_type[node.node_type] += node.real_time.total_seconds() / args.runs
        print(json.dumps({"ir": ir, "mode": "static, per node type", "sum_ms": round(sum(by_type.values()) * 1e3, 2),
                          "ms": {k: round(v * 1e3, 3) for k, v in by_type.most_common(6)}}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bandwidth")
    p.add_argument("--threads", type=int)
    p.set_defaults(run=bandwidth)
    p = sub.add_parser("weights")
    p.add_argument("exports", nargs="+")
    p.set_defaults(run=weights)
    p = sub.add_parser("per-token")
    p.add_argument("irs", nargs="+")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--shape", default="32x128")
    p.add_argument("--rounds", type=int, default=4)
    p.set_defaults(run=per_token)
    p = sub.add_parser("padding")
    p.add_argument("--texts", required=True)
    p.add_argument("--export", required=True)
    p.set_defaults(run=padding)
    p = sub.add_parser("linears")
    p.add_argument("export")
    p.add_argument("--rows", type=int, action="append", required=True)
    p.add_argument("--threads", type=int)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--runs", type=int, default=20)
    p.set_defaults(run=linears)
    p = sub.add_parser("nodes")
    p.add_argument("irs", nargs="+")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--shape", default="1x16")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--runs", type=int, default=30)
    p.set_defaults(run=nodes)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
