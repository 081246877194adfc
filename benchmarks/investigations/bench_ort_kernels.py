"""Which ONNX Runtime fusions pay on this CPU: the attention fusion at export and SkipLayerNormalization at load.

Two parts, one process:

1. Kernels: a residual Add then LayerNormalization against ONNX Runtime's fused ``SkipLayerNormalization``, at
   MiniLM's width (384) for a short query (15 tokens) and a batch of 32 sentences (1,280 tokens), each operator
   chained 12 times in a small graph, microseconds per operator (median over many runs).
2. Graphs: the demo adapter on all-MiniLM-L6-v2 exported twice (``--no-fuse-attention`` and the default attention
   fusion), fp32 and dynamic int8 each, every graph loaded with the SkipLayerNormalization fusion on and off
   (``SessionSettings(fuse_skip_layer_norm=...)``); batch-1 p50 over short real queries and batch-32 sentences/s
   over real sentences through ``EmbeddingModel.encode``, contenders in alternating order, medians over rounds.
   Embeddings are compared with the first contender of the same precision before timing.

    python benchmarks/investigations/bench_ort_kernels.py            # about 4 minutes on 2 cores
    python benchmarks/investigations/bench_ort_kernels.py --quick    # smoke run: tiny counts, one round
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from peft_export.bench.builders import onnx_export
from peft_export.bench.report import Report
from peft_export.bench.rounds import alternating_rounds
from peft_export.runtime.similarity import cosine_rows
from peft_export.bench.texts import demo_queries_and_sentences
from peft_export.bench.timing import time_single_queries, time_throughput

WIDTH = 384
CHAIN = 12

COLUMNS = [
    ("contender", "contender", ""),
    ("b1_p50_ms", "b1 p50 ms", ".3f"),
    ("b32_per_s", "b32 sentences/s", ".1f"),
    ("max_diff", "max diff vs first of its precision", ".1e"),
    ("worst_cosine", "worst cosine vs first of its precision", ".5f"),
    ("graph_nodes", "nodes in the file", "d"),
]


def _chain_model(op: str):
    from onnx import TensorProto, helper, numpy_helper

    nodes, current = [], "x"
    for i in range(CHAIN):
        out = f"y{i}"
        if op == "Add+LayerNormalization":
            nodes += [helper.make_node("Add", [current, "skip"], [f"s{i}"]),
                      helper.make_node("LayerNormalization", [f"s{i}", "gamma", "beta"], [out], axis=-1, epsilon=1e-12)]
        else:
            nodes.append(helper.make_node("SkipLayerNormalization", [current, "skip", "gamma", "beta"], [out],
                                          domain="com.microsoft", epsilon=1e-12))
        current = out
    shape = [1, "tokens", WIDTH]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "skip")],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(np.ones(WIDTH, np.float32), "gamma"),
                     numpy_helper.from_array(np.zeros(WIDTH, np.float32), "beta")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def kernel_times(quick: bool) -> list[dict]:
    """Microseconds per operator, Add + LayerNormalization vs SkipLayerNormalization, ORT's default threads."""
    import onnxruntime as ort

    from peft_export import SessionSettings

    rows = []
    rng = np.random.default_rng(0)
    for tokens in (15, 1280):
        feeds = {n: rng.standard_normal((1, tokens, WIDTH), dtype=np.float32) for n in ("x", "skip")}
        outputs = {}
        for op in ("Add+LayerNormalization", "SkipLayerNormalization"):
            settings = SessionSettings(fuse_skip_layer_norm=False)  # no fusion behind the chain's back
            session = ort.InferenceSession(_chain_model(op).SerializeToString(), settings.to_session_options(ort),
                                           providers=["CPUExecutionProvider"],
                                           disabled_optimizers=settings.disabled_optimizers(["CPUExecutionProvider"]))
            outputs[op] = session.run(None, feeds)[0]
            runs = 20 if quick else max(50, 40000 // tokens)
            for _ in range(5):
                session.run(None, feeds)
            samples = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feeds)
                samples.append(time.perf_counter() - start)
            rows.append({"tokens": tokens, "operator": op, "us_per_op": statistics.median(samples) * 1e6 / CHAIN})
        diff = float(np.abs(outputs["Add+LayerNormalization"] - outputs["SkipLayerNormalization"]).max())
        rows[-1]["max_diff"] = rows[-2]["max_diff"] = diff
    return rows


def build_exports(folder: Path, base: str, adapter: str, quick: bool) -> dict[str, Path]:
    from peft_export.export.gate import QualityGate

    exports = {}
    for fused in (False, True):
        for quantize in (None, "int8"):
            name = f"{'fused' if fused else 'traced'} {'int8' if quantize else 'fp32'}"
            out = folder / name.replace(" ", "-")
            gate = QualityGate(0.9, 0.5, 0.5) if quick else QualityGate()  # tiny models fail the real gate
            exports[name] = onnx_export(adapter, out, base=base, fuse_attention=fused, quantize=quantize, gate=gate)[0]
    return exports


def graph_rows(exports: dict[str, Path], queries: list[str], sentences: list[str], rounds: int) -> list[dict]:
    import onnx

    from peft_export import EmbeddingModel, SessionSettings

    models, nodes = {}, {}
    for name, folder in exports.items():
        for skip in (False, True):
            label = f"{name}, SkipLayerNorm fusion {'on' if skip else 'off (default on CPU)'}"
            models[label] = EmbeddingModel(folder, session_settings=SessionSettings(fuse_skip_layer_norm=skip))
            nodes[label] = len(onnx.load(str(folder / models[label].config.model_file),
                                         load_external_data=False).graph.node)
    firsts: dict[str, np.ndarray] = {}
    diffs, cosines = {}, {}
    for label, model in models.items():
        precision = "int8" if "int8" in label else "fp32"
        got = model.encode(sentences[:64])
        firsts.setdefault(precision, got)
        diffs[label] = float(np.abs(got - firsts[precision]).max())
        cosines[label] = float(cosine_rows(got, firsts[precision]).min())

    def measure(label: str) -> tuple[float, float]:
        model = models[label]
        b1 = time_single_queries(lambda q: model.encode([q], batch_size=1), queries)["p50_ms"]
        b32 = time_throughput(lambda s: model.encode(s, batch_size=32), sentences, repeats=1)
        return b1, b32["sentences_per_s"]

    results = alternating_rounds(list(models), rounds, measure)
    return [{"contender": label, "b1_p50_ms": statistics.median(r[0] for r in rounds_),
             "b32_per_s": statistics.median(r[1] for r in rounds_), "max_diff": diffs[label],
             "worst_cosine": cosines[label],
             "graph_nodes": nodes[label]} for label, rounds_ in results.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base Sentence Transformers folder (default: bundled MiniLM)")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: the demo adapter)")
    parser.add_argument("--queries", type=int, default=200, help="short real queries (batch 1)")
    parser.add_argument("--sentences", type=int, default=320, help="real sentences (batch 32)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench-results", help="folder for bench_ort_kernels.md/.json")
    parser.add_argument("--quick", action="store_true", help="30 queries, 64 sentences, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.sentences, args.rounds = min(args.queries, 30), min(args.sentences, 64), 1

    from peft_export.demo import DEMO_ADAPTER_DIR, bundled_base_model_path

    kernels = kernel_times(args.quick)
    queries, sentences = demo_queries_and_sentences(args.queries, args.sentences)
    with tempfile.TemporaryDirectory(prefix="bench-kernels-") as scratch:
        exports = build_exports(Path(scratch), args.base or str(bundled_base_model_path()),
                                args.adapter or str(DEMO_ADAPTER_DIR), args.quick)
        rows = graph_rows(exports, queries, sentences, args.rounds)
    for row in rows:
        # fp32 graphs must agree to float rounding; int8 ones re-quantize activations that moved by that rounding,
        # so they are held to the int8 gate's worst-sentence bar against each other.
        if row["max_diff"] > 1e-5 if "fp32" in row["contender"] else row["worst_cosine"] < 0.97:
            print(f"FAIL: {row['contender']} differs from the first of its precision (max diff {row['max_diff']:.1e}, "
                  f"worst cosine {row['worst_cosine']:.5f})", file=sys.stderr)
            return 1
    report = Report("ONNX Runtime fusions on this CPU: attention (export) and SkipLayerNormalization (load)")
    report.rows = rows
    report.extra["kernels"] = kernels
    kernel_lines = [f"{k['operator']} at {k['tokens']} tokens x {WIDTH}: {k['us_per_op']:.1f} us per operator"
                    for k in kernels]
    report.notes += [
        "Kernels (12 chained operators, ORT default threads, median): " + "; ".join(kernel_lines) + ".",
        f"{len(queries)} short real queries (batch 1), {len(sentences)} real sentences (batch 32) through "
        f"EmbeddingModel.encode; medians over {args.rounds} rounds in alternating order. int8: dynamic, per-channel, "
        "first rung of the quality ladder that passes the gate.",
    ]
    path = report.write(Path(args.out), "bench_ort_kernels", COLUMNS)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
