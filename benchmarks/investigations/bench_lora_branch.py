"""What one LoRA branch costs ONNX Runtime at batch 1: the nodes, not the arithmetic.

A switchable graph adds ``(x @ A) @ B`` and an Add at every targeted Linear (three nodes). This measures what
those three nodes cost per branch in two small synthetic graphs at MiniLM's sizes, for one 15-token query:

* "small ops only": a chain of branches on a (15, 384) activation, nothing else in the graph;
* "between large MatMuls": six layers of MatMul 384 -> 1536, Relu, MatMul 1536 -> 384 (MiniLM's feed-forward
  weights, 4.7 MB per layer), with and without a branch on each of the twelve MatMuls, as in the real graph.

Per branch = (time with branches - time without) / branches, medians over alternating rounds, for ranks 1, 8
and 32 and one or two intra-op threads. If the cost does not grow with the rank, it is per-node overhead.

    python benchmarks/investigations/bench_lora_branch.py [--rounds 5] [--runs 300]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from peft_export.bench.rounds import alternating_rounds
from peft_export.bench.stats import median

HIDDEN, FFN, TOKENS, LAYERS, CHAIN = 384, 1536, 15, 6, 36


def _graph(context: str, rank: int, branches: bool):
    """(ModelProto, branch count): ``context`` is "small" (branches only) or "large" (the feed-forward layers)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, count = [], [], 0

    def weight(name: str, shape: tuple[int, int]) -> str:
        weights.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype(np.float32), name))
        return name

    def branch(x: str, base: str, size_in: int, size_out: int, tag: str) -> str:
        nonlocal count
        count += 1
        a, b = weight(f"A{tag}", (size_in, rank)), weight(f"B{tag}", (rank, size_out))
        nodes.extend([helper.make_node("MatMul", [x, a], [f"z{tag}"]),
                      helper.make_node("MatMul", [f"z{tag}", b], [f"d{tag}"]),
                      helper.make_node("Add", [base, f"d{tag}"], [f"s{tag}"])])
        return f"s{tag}"

    current = "x"
    if context == "small":
        for i in range(CHAIN if branches else 0):
            current = branch(current, current, HIDDEN, HIDDEN, str(i))
        if not branches:
            nodes.append(helper.make_node("Identity", [current], ["out"]))
            current = "out"
    else:
        for i in range(LAYERS):
            for j, (size_in, size_out) in enumerate(((HIDDEN, FFN), (FFN, HIDDEN))):
                out = f"m{i}_{j}"
                nodes.append(helper.make_node("MatMul", [current, weight(f"W{i}_{j}", (size_in, size_out))], [out]))
                if branches:
                    out = branch(current, out, size_in, size_out, f"{i}_{j}")
                if j == 0:
                    nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
                    out = f"r{i}"
                current = out
    graph = helper.make_graph(nodes, "lora_branch", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   [1, "tokens", HIDDEN])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), count


def _session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")  # the runtime's default settings
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _median_run_us(session, feeds: dict, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return median(times) * 1e6


def measure(context: str, rank: int, threads: int, rounds: int, runs: int) -> dict:
    plain, _ = _graph(context, rank, branches=False)
    with_branches, count = _graph(context, rank, branches=True)
    sessions = {False: _session(plain, threads), True: _session(with_branches, threads)}
    feeds = {"x": np.random.default_rng(1).standard_normal((1, TOKENS, HIDDEN)).astype(np.float32)}
    for session in sessions.values():
        _median_run_us(session, feeds, 30)
    times = alternating_rounds([False, True], rounds, lambda key: _median_run_us(sessions[key], feeds, runs))
    without, with_ = median(times[False]), median(times[True])
    return {"context": context, "rank": rank, "threads": threads, "branches": count, "without_us": without,
            "with_us": with_, "per_branch_us": (with_ - without) / count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=300, help="runs per round and contender")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    print(f"ONNX Runtime {ort.__version__}, one {TOKENS}-token query, medians over {args.rounds} rounds")
    print("| graph | rank | threads | branches | without | with | per branch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for context in ("small", "large"):
        for threads in (1, 2):
            for rank in (1, 8, 32):
                row = measure(context, rank, threads, args.rounds, args.runs)
                label = "small ops only" if context == "small" else "between large MatMuls"
                print(f"| {label} | {rank} | {threads} | {row['branches']} | {row['without_us']:.1f} us | "
                      f"{row['with_us']:.1f} us | {row['per_branch_us']:.2f} us |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
