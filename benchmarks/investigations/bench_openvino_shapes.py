"""What input shapes cost OpenVINO at batch 1: first-seen lengths, length changes, and static-shape buckets.

OpenVINO compiles kernels for each new input shape and re-plans a run whenever the shape differs from the previous
call's. This measures both on the demo exports (static int8 IR under the f32 hint; the fp32 IR under bf16 and
f32), and the alternative measured and not adopted: one compiled model per padded length bucket.

1. ``encode([query])`` over short real queries, twice: the first pass meets each length for the first time (after
   a few warm-up queries), the second pass has seen them all.
2. Raw infer requests at a fixed length vs alternating between two lengths (one token apart).
3. Static buckets: the IR reshaped to (1, L) and compiled once per bucket L; inputs padded to their bucket;
   alternating inputs of two buckets, with the memory and compile time each bucket costs and the largest
   difference from the dynamic model's embeddings (f32 must agree within 1e-5; int8 and bf16 kernels are
   chosen by shape, so those move by their own rounding noise).

    python benchmarks/investigations/bench_openvino_shapes.py          # demo exports (built once in --workdir)
    python benchmarks/investigations/bench_openvino_shapes.py --quick  # smoke run
    python benchmarks/investigations/bench_openvino_shapes.py --static-int8 DIR --fp32 DIR   # other exports
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from peft_export.bench.builders import merged_variants
from peft_export.bench.child import resident_mb
from peft_export.bench.report import Report
from peft_export.bench.suite import cpu_has_bf16
from peft_export.bench.timing import time_single_queries

COLUMNS = [
    ("contender", "contender", ""),
    ("first_p50_ms", "1st pass p50 ms", ".2f"),
    ("first_p95_ms", "1st pass p95 ms", ".2f"),
    ("first_max_ms", "1st pass max ms", ".1f"),
    ("second_p50_ms", "2nd pass p50 ms", ".2f"),
    ("second_p95_ms", "2nd pass p95 ms", ".2f"),
    ("same_shape_ms", "one length ms", ".3f"),
    ("alternating_ms", "two lengths ms", ".3f"),
    ("buckets_ms", "static buckets ms", ".3f"),
    ("bucket_mb", "MB per bucket", ".0f"),
    ("bucket_compile_s", "compile s per bucket", ".2f"),
    ("bucket_max_diff", "buckets vs dynamic", ".1e"),
]


def _feeds(names: list[str], length: int, padded_to: int | None = None) -> dict[str, np.ndarray]:
    """Synthetic batch-1 inputs: ``length`` real-looking tokens, zero-padded (and masked) to ``padded_to``."""
    width = padded_to or length
    ids = np.zeros((1, width), np.int64)
    ids[0, :length] = 2000
    ids[0, 0], ids[0, length - 1] = 101, 102  # [CLS] ... [SEP]
    mask = np.zeros((1, width), np.int64)
    mask[0, :length] = 1
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((1, width), np.int64)}
    return {name: values[name] for name in names}


def _median_ms(cycle: list, runs: int) -> float:
    """Median ms of ``runs`` infer calls going round ``cycle``, a list of (infer request, inputs)."""
    times = []
    for i in range(runs):
        request, feeds = cycle[i % len(cycle)]
        start = time.perf_counter()
        request.infer(feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _passes(folder: Path, precision: str, queries: list[str], warmup: int) -> dict[str, float]:
    from peft_export.runtime.model import EmbeddingModel

    model = EmbeddingModel(folder, inference_precision=precision)
    result = {}
    for name, untimed in (("first", warmup), ("second", 0)):
        times = time_single_queries(lambda text: model.encode([text]), queries, warmup=untimed)
        for key in ("p50", "p95", "max"):
            result[f"{name}_{key}_ms"] = times[f"{key}_ms"]
    result["distinct_lengths"] = len(set(model._tokenizer.count_tokens(queries)))
    return result


def _shapes(folder: Path, precision: str, buckets: list[int], runs: int) -> dict[str, float]:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    base = core.read_model(str(folder / "openvino_model.xml"))
    names = [port.get_any_name() for port in base.inputs]
    dynamic = core.compile_model(base, "CPU", config).create_infer_request()
    short, longer = buckets[0] - 1, buckets[0] + 4  # one input per bucket for the alternating run
    fixed, other = _feeds(names, short + 2), _feeds(names, short + 3)
    for _ in range(20):
        dynamic.infer(fixed), dynamic.infer(other)
    result = {"same_shape_ms": _median_ms([(dynamic, fixed)], runs),
              "alternating_ms": _median_ms([(dynamic, fixed), (dynamic, other)], runs)}
    reference = dynamic.infer(_feeds(names, short))["sentence_embedding"].copy()

    rss, started = resident_mb(), time.perf_counter()
    requests = {}
    for length in buckets:
        model = base.clone()
        model.reshape({name: ov.PartialShape([1, length]) for name in names})
        requests[length] = core.compile_model(model, "CPU", config).create_infer_request()
        requests[length].infer(_feeds(names, 2, length))  # allocate its buffers, as serving would
    result["bucket_compile_s"] = (time.perf_counter() - started) / len(buckets)
    result["bucket_mb"] = (resident_mb() - rss) * 2**20 / 1e6 / len(buckets)
    padded = requests[buckets[0]].infer(_feeds(names, short, buckets[0]))["sentence_embedding"]
    result["bucket_max_diff"] = float(np.abs(padded - reference).max())
    pairs = [(requests[buckets[0]], _feeds(names, short, buckets[0])),
             (requests[buckets[1]], _feeds(names, longer, buckets[1]))]
    for request, feeds in pairs * 20:
        request.infer(feeds)
    result["buckets_ms"] = _median_ms(pairs, runs)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--static-int8", help="an OpenVINO static int8 export (default: the demo's, built once)")
    parser.add_argument("--fp32", help="an OpenVINO fp32 export (default: the demo's, built once)")
    parser.add_argument("--workdir", default="bench-results/openvino-exports")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)

    if not (args.static_int8 and args.fp32):
        from peft_export.demo import DEMO_ADAPTER_DIR, bundled_base_model_path

        exports = merged_variants(str(bundled_base_model_path()), str(DEMO_ADAPTER_DIR), Path(args.workdir),
                                  ["openvino-fp32", "openvino-int8-static"])
        args.static_int8 = args.static_int8 or exports["openvino-int8-static"]
        args.fp32 = args.fp32 or exports["openvino-fp32"]
    from peft_export.demo import load_pairs

    queries = [p["query"] for p in load_pairs("eval")][: 40 if args.quick else 300]
    buckets = [16, 32] if args.quick else [16, 32, 64, 128]
    runs = 40 if args.quick else 400
    contenders = [("static int8 IR, f32 hint", Path(args.static_int8), "f32"),
                  ("fp32 IR, bf16 hint", Path(args.fp32), "bf16"),
                  ("fp32 IR, f32 hint", Path(args.fp32), "f32")]
    if not cpu_has_bf16():
        contenders = [c for c in contenders if c[2] != "bf16"]
    report = Report("OpenVINO at batch 1: first-seen lengths, length changes, static-shape buckets")
    for label, folder, precision in contenders:
        print(f"measuring {label} ...", flush=True)
        row = {"contender": label, "export": str(folder), "precision": precision}
        row.update(_passes(folder, precision, queries, warmup=5 if args.quick else 20))
        row.update(_shapes(folder, precision, buckets, runs))
        report.rows.append(row)
    report.notes += [
        f"passes: {len(queries)} short real queries through EmbeddingModel.encode, one at a time, after "
        f"{5 if args.quick else 20} warm-up queries; {report.rows[0]['distinct_lengths']} distinct token lengths",
        f"raw infer requests (LATENCY hint), {runs} runs: one length = {buckets[0] + 1} tokens every call; two "
        f"lengths = {buckets[0] + 1} and {buckets[0] + 2} tokens alternating",
        f"static buckets: lengths {buckets}, each compiled once; alternating a {buckets[0] - 1}-token input in "
        f"bucket {buckets[0]} and a {buckets[0] + 4}-token input in bucket {buckets[1]}; memory = resident set "
        "growth over all buckets divided by their number",
    ]
    md = report.write(Path(args.out), "bench_openvino_shapes", COLUMNS)
    print(md.read_text())
    # f32 arithmetic must not notice the padding; int8 and bf16 kernels are picked by shape, so their results
    # move slightly with it (reported, as the batch-composition noise of those precisions).
    bad = [r["contender"] for r in report.rows if r["precision"] == "f32" and "int8" not in r["contender"]
           and r["bucket_max_diff"] > 1e-5]
    if bad:
        print(f"FAIL: padded static buckets disagree with the dynamic model for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
