"""How close two measured paths are to what this machine can do at all (issue 23's batch-1 targets, issue 25's bf16
target): the memory read bandwidth, the weight bytes a batch-1 query must stream, and the per-token cost of two
OpenVINO IRs at the same input shape.

    python benchmarks/investigations/bench_bounds.py bandwidth
    python benchmarks/investigations/bench_bounds.py weights GRAPH_OR_DIR [GRAPH_OR_DIR ...]
    python benchmarks/investigations/bench_bounds.py per-token IR_XML IR_XML --precision bf16 --shape 32x128
    python benchmarks/investigations/bench_bounds.py padding --texts TEXTS_JSON --export RERANKER_EXPORT

``bandwidth``: GB/s of summing a 1 GiB float32 array split over the cores (threads; numpy releases the GIL), best of
five. ``weights``: bytes of an ONNX export's initializers that every query reads (those only gathered from, the
token embedding tables, are left out), and that over the bandwidth = the least time a batch-1 query can take when
the weights do not fit in cache. ``per-token``: p50 of 10 runs at one shape per IR, alternating, in microseconds per
token. ``padding``: real and padded tokens of a rerank request under peft_export's batch plan and under
sentence-transformers' (sorted by length, batches of 32).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


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
    times: list[list[float]] = [[] for _ in compiled]
    for round_ in range(args.rounds):
        order = range(len(compiled)) if round_ % 2 == 0 else reversed(range(len(compiled)))
        for i in order:
            names = [port.get_any_name() for port in compiled[i].inputs]
            feeds = {n: ids if "input_ids" in n else np.ones_like(ids) if "mask" in n else np.zeros_like(ids)
                     for n in names}
            request = compiled[i].create_infer_request()
            for _ in range(3):
                request.infer(feeds)
            for _ in range(10):
                start = time.perf_counter()
                request.infer(feeds)
                times[i].append(time.perf_counter() - start)
    for xml, runs in zip(args.irs, times):
        p50 = statistics.median(runs)
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
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
