"""Eager sentence-transformers + PEFT adapter vs peft_export's EmbeddingModel on ONNX Runtime CPU.

Measures, in one run on one machine: batch-1 latency over short real queries (p50/p95/p99), batch-32 throughput
over real sentences of mixed lengths, the export's wall time and size, and checks that both contenders give the
same embeddings (max abs diff, worst cosine) before reporting any speed.

    python benchmarks/bench_encode.py                 # demo adapter on the bundled all-MiniLM-L6-v2
    python benchmarks/bench_encode.py --quick         # smoke run, well under a minute
    python benchmarks/bench_encode.py --base DIR --adapter DIR --export EXISTING_EXPORT
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from peft_export.bench.builders import onnx_export
from peft_export.bench.report import Report
from peft_export.runtime.similarity import cosine_rows
from peft_export.bench.texts import demo_queries_and_sentences
from peft_export.bench.timing import time_single_queries, time_throughput

COLUMNS = [
    ("contender", "contender", ""),
    ("b1_p50_ms", "batch-1 p50 ms", ".2f"),
    ("b1_p95_ms", "p95 ms", ".2f"),
    ("b1_p99_ms", "p99 ms", ".2f"),
    ("b1_speedup", "batch-1 speed-up", ".2f"),
    ("b32_per_s", "batch-32 sentences/s", ".1f"),
    ("b32_speedup", "throughput ratio", ".2f"),
    ("max_abs_diff", "max abs diff vs eager", ".1e"),
    ("worst_cosine", "worst cosine vs eager", ".7f"),
]


def main(argv: list[str] | None = None) -> int:
    from peft_export.demo import DEMO_ADAPTER_DIR, bundled_base_model_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base Sentence Transformers folder (default: bundled MiniLM)")
    parser.add_argument("--adapter", default=str(DEMO_ADAPTER_DIR), help="adapter folder (default: demo adapter)")
    parser.add_argument("--export", help="export folder of the same base+adapter (exported there if it is not one; "
                                         "default: a new temporary folder)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="bench-results", help="folder for the Markdown and JSON reports")
    parser.add_argument("--quick", action="store_true", help="60 queries, 200 sentences, one pass")
    args = parser.parse_args(argv)
    args.base = args.base or str(bundled_base_model_path())
    repeats = 1 if args.quick else 3
    if args.quick:
        args.queries, args.sentences = min(args.queries, 60), min(args.sentences, 200)

    import torch
    from sentence_transformers import SentenceTransformer

    from peft_export import EmbeddingModel

    queries, sentences = demo_queries_and_sentences(args.queries, args.sentences)
    export_dir, manifest = onnx_export(args.adapter, Path(args.export or tempfile.mkdtemp(prefix="bench-export-"))
                                       / ("" if args.export else "model"), base=args.base)

    eager = SentenceTransformer(args.base, device="cpu")
    eager.load_adapter(args.adapter)
    ours = EmbeddingModel(export_dir)
    contenders = {
        "eager sentence-transformers + PEFT adapter (unmerged)": eager,
        "peft_export EmbeddingModel, ONNX Runtime CPU (merged)": ours,
    }
    report = Report("peft_export vs eager PyTorch: merged ONNX export")
    reference = None
    with torch.inference_mode():
        for name, model in contenders.items():
            embeddings = model.encode(sentences, batch_size=args.batch_size)
            row = {"contender": name}
            if reference is None:
                reference = embeddings
            row["max_abs_diff"] = float(np.abs(embeddings - reference).max())
            row["worst_cosine"] = float(cosine_rows(embeddings, reference).min())
            lat = time_single_queries(lambda q, m=model: m.encode([q], batch_size=1), queries)
            row.update({f"b1_{k}": v for k, v in lat.items() if k.endswith("ms")})
            thr = time_throughput(lambda s, m=model: m.encode(s, batch_size=args.batch_size), sentences, repeats)
            row["b32_per_s"] = thr["sentences_per_s"]
            report.rows.append(row)
    base_row = report.rows[0]
    for row in report.rows:
        row["b1_speedup"] = base_row["b1_p50_ms"] / row["b1_p50_ms"]
        row["b32_speedup"] = row["b32_per_s"] / base_row["b32_per_s"]
    report.notes += [
        f"{len(queries)} short real queries for batch-1 latency (20 warm-up calls); {len(sentences)} real sentences "
        f"of mixed lengths at batch {args.batch_size}, median of {repeats} passes.",
        f"torch threads {torch.get_num_threads()}; ONNX Runtime providers {ours.backend.providers}, "
        "default SessionSettings (all cores, threads spin during runs and stop after).",
        f"export: {manifest.get('export_seconds', 0):.1f} s inside the exporter"
        + (f", {manifest['bench_export_wall_s']:.1f} s wall in this process"
           if "bench_export_wall_s" in manifest else "")
        + f"; output {manifest.get('size_bytes', 0) / 1e6:.1f} MB.",
    ]
    report.extra["export"] = {k: manifest.get(k) for k in ("export_seconds", "size_bytes", "bench_export_wall_s")}
    path = report.write(Path(args.out), "bench_encode", COLUMNS)
    print(path.read_text())
    if report.rows[-1]["max_abs_diff"] > 1e-5:
        print("FAIL: EmbeddingModel differs from eager by more than 1e-5", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
