"""ONNX Runtime thread spinning: what SessionSettings' spinning options cost and gain, one process, one run.

Three settings of the runtime's ONNX Runtime backend, each on the same export through ``EmbeddingModel``:
worker threads that sleep between operators (spinning off), threads that spin and keep spinning for a while
after each run (ORT's own default), and threads that spin only while a run is in progress
(``session.force_spinning_stop``, peft_export's default). Workloads, all real text:

* one model, batch 1: p50 of single short queries, and the process CPU time each query costs;
* one model, batch 32: sentences/s over real sentences of mixed lengths;
* two models called in turn, batch 1: two sessions of the same export, each query to the other one (two models
  in a process, or merged adapters that requests rotate between);
* two models at the same time: one thread per model, batch 1 (queries/s) and batch 32 (sentences/s);
* one model, four threads calling at once, batch 1 (queries/s).

Settings run in alternating order over several rounds; every figure is the median over rounds.

    python benchmarks/investigations/bench_spinning.py                     # exports the demo adapter on MiniLM first
    python benchmarks/investigations/bench_spinning.py --export DIR        # an existing ONNX export
    python benchmarks/investigations/bench_spinning.py --quick             # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from peft_export.bench.builders import onnx_export
from peft_export.bench.report import Report
from peft_export.bench.rounds import alternating_rounds
from peft_export.bench.texts import demo_queries_and_sentences
from peft_export.bench.timing import time_throughput

SETTINGS = {
    "spinning off (SessionSettings.throughput())": dict(allow_spinning=False),
    "spinning, kept on after each run (ORT's default)": dict(allow_spinning=True, stop_spinning_between_runs=False),
    "spinning during runs only (default)": dict(allow_spinning=True, stop_spinning_between_runs=True),
}

COLUMNS = [
    ("settings", "settings", ""),
    ("one_b1_ms", "one model, b1 p50 ms", ".3f"),
    ("one_b1_cpu_ms", "CPU ms per b1 query", ".2f"),
    ("one_b32_per_s", "one model, b32 /s", ".1f"),
    ("turns_b1_ms", "two models in turn, b1 p50 ms", ".3f"),
    ("both_b1_per_s", "two models at once, b1 queries/s", ".0f"),
    ("both_b32_per_s", "two models at once, b32 /s", ".1f"),
    ("threads_b1_per_s", "one model, 4 threads, b1 queries/s", ".0f"),
]


def single_latency(models: list, queries: list[str]) -> tuple[float, float]:
    """p50 wall ms of batch-1 calls, each to the next model in turn, and the process CPU ms per call."""
    for q in queries[:10]:
        for model in models:
            model.encode([q], batch_size=1)
    samples = []
    cpu_start = time.process_time()
    for i, q in enumerate(queries):
        model = models[i % len(models)]
        start = time.perf_counter()
        model.encode([q], batch_size=1)
        samples.append(time.perf_counter() - start)
    cpu_ms = (time.process_time() - cpu_start) * 1000 / len(queries)
    return statistics.median(samples) * 1000, cpu_ms


def concurrent_rate(models: list, threads: int, work: list[list[str]], batch_size: int) -> float:
    """Texts per second with ``threads`` threads at once, thread i on models[i % len(models)], each encoding
    every item of ``work`` (one encode call per item)."""
    barrier = threading.Barrier(threads + 1)

    def run(model):
        barrier.wait()
        for texts in work:
            model.encode(texts, batch_size=batch_size)

    pool = [threading.Thread(target=run, args=(models[i % len(models)],)) for i in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    return threads * sum(len(texts) for texts in work) / (time.perf_counter() - start)


def measure(models: list, queries: list[str], sentences: list[str]) -> dict[str, float]:
    one, other = models
    batches = [sentences[i:i + 32] for i in range(0, len(sentences), 32)]
    row = {}
    row["one_b1_ms"], row["one_b1_cpu_ms"] = single_latency([one], queries)
    row["one_b32_per_s"] = time_throughput(lambda s: one.encode(s, batch_size=32), sentences, repeats=1)[
        "sentences_per_s"]
    row["turns_b1_ms"] = single_latency([one, other], queries)[0]
    row["both_b1_per_s"] = concurrent_rate([one, other], 2, [[q] for q in queries], 1)
    row["both_b32_per_s"] = concurrent_rate([one, other], 2, batches, 32)
    row["threads_b1_per_s"] = concurrent_rate([one], 4, [[q] for q in queries], 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base Sentence Transformers folder (default: bundled MiniLM)")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: the demo adapter)")
    parser.add_argument("--export", help="an ONNX export folder (default: export --adapter on --base now)")
    parser.add_argument("--queries", type=int, default=200, help="short real queries per batch-1 workload")
    parser.add_argument("--sentences", type=int, default=320, help="real sentences per batch-32 workload")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all settings, alternating order")
    parser.add_argument("--out", default="bench-results", help="folder for bench_spinning.md/.json")
    parser.add_argument("--quick", action="store_true", help="40 queries, 64 sentences, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.sentences, args.rounds = min(args.queries, 40), min(args.sentences, 64), 1

    from peft_export import EmbeddingModel, SessionSettings
    from peft_export.demo import DEMO_ADAPTER_DIR, bundled_base_model_path

    args.base = args.base or str(bundled_base_model_path())
    args.adapter = args.adapter or str(DEMO_ADAPTER_DIR)
    export = args.export or onnx_export(args.adapter, Path(tempfile.mkdtemp(prefix="bench-export-")) / "model",
                                        base=args.base)[0]
    queries, sentences = demo_queries_and_sentences(args.queries, args.sentences)
    models = {name: [EmbeddingModel(export, session_settings=SessionSettings(**kw)) for _ in range(2)]
              for name, kw in SETTINGS.items()}
    reference = models[next(iter(models))][0].encode(sentences[:64])
    for name, pair in models.items():
        for model in pair:
            diff = float(np.abs(model.encode(sentences[:64]) - reference).max())
            if diff > 1e-6:
                print(f"FAIL: {name} differs from the first setting by {diff:.1e}", file=sys.stderr)
                return 1
    results = alternating_rounds(list(models), args.rounds, lambda name: measure(models[name], queries, sentences))

    report = Report("ONNX Runtime thread spinning: SessionSettings compared")
    for name, rounds in results.items():
        row = {"settings": name}
        for key in rounds[0]:
            row[key] = float(statistics.median(r[key] for r in rounds))
        row["rounds"] = rounds
        report.rows.append(row)
    threads = models[next(iter(models))][0].backend.describe()["intra_op_threads"]
    report.notes += [
        f"Export: {export}. {len(queries)} short real queries (batch 1), {len(sentences)} real sentences of mixed "
        f"lengths (batch 32, the runtime's default token budget); medians over {args.rounds} rounds, settings in "
        "alternating order.",
        f"intra_op_num_threads {threads or 'all physical cores'} for every session; outputs of all settings equal "
        "(checked first).",
        "CPU ms per b1 query: process CPU time (all threads) over the one-model batch-1 pass, divided by queries.",
    ]
    path = report.write(Path(args.out), "bench_spinning", COLUMNS)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
