"""Cold vs warm passes of OpenVINO over real text, with and without shape buckets (runtime/shape_buckets.py).

A fresh process loads an OpenVINO export and encodes the same texts three times (batch 32): the first pass meets
every shape for the first time, the later ones have compiled them. Each setting runs in its own process, the
order alternated over rounds; the report gives medians of texts/s per pass and cold/warm (pass 1 / median of
passes 2-3). Buckets must keep results: the largest difference from the unbucketed embeddings is checked.

    python benchmarks/investigations/bench_openvino_buckets.py       # demo MiniLM export (built into --workdir)
    python benchmarks/investigations/bench_openvino_buckets.py --export DIR --texts 256 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from peft_export.bench.builders import merged_variants
from peft_export.bench.child import must_succeed, run_child
from peft_export.bench.report import Report
from peft_export.bench.rounds import alternating_rounds
from peft_export.bench.texts import corpus_texts

COLUMNS = [("contender", "contender", ""), ("pass1", "pass 1 texts/s", ".1f"), ("pass2", "pass 2 texts/s", ".1f"),
           ("pass3", "pass 3 texts/s", ".1f"), ("cold_over_warm", "cold / warm", ".2f"),
           ("distinct_shapes", "shapes seen", "d"), ("max_diff", "max diff vs unbucketed", ".1e"),
           ("load", "load avg", "")]


def child(export: str, buckets: bool, count: int, precision: str, out: str) -> None:
    from peft_export import EmbeddingModel
    from peft_export.runtime.openvino_backend import OpenVinoSettings
    from peft_export.runtime.shape_buckets import batch_bucket, length_bucket

    model = EmbeddingModel(export, openvino_settings=OpenVinoSettings(precision=precision, shape_buckets=buckets))
    corpus = corpus_texts(count)
    rates, result = [], None
    for _ in range(3):
        start = time.perf_counter()
        result = model.encode(corpus, batch_size=32)
        rates.append(len(corpus) / (time.perf_counter() - start))
    shapes = set()
    for index, feeds in model._tokenizer.batches(corpus, 32):
        rows, length = feeds["input_ids"].shape
        shapes.add((batch_bucket(rows), length_bucket(length, model.config.max_seq_length)) if buckets
                   else (rows, length))
    np.save(out + ".npy", result)
    Path(out).write_text(json.dumps({"rates": rates, "shapes": len(shapes)}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", help="OpenVINO export folder (default: the demo MiniLM + adapter, fp32)")
    parser.add_argument("--workdir", default="bench-results/openvino-exports")
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="f32")
    parser.add_argument("--label", default="all-MiniLM-L6-v2 + demo adapter")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--child", nargs=3, metavar=("EXPORT", "BUCKETS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1] == "1", args.texts, args.precision, args.child[2])
        return 0
    if not args.export:
        from peft_export.demo import DEMO_ADAPTER_DIR, bundled_base_model_path

        args.export = str(merged_variants(str(bundled_base_model_path()), str(DEMO_ADAPTER_DIR), Path(args.workdir),
                                          ["openvino-fp32"])["openvino-fp32"])
    scratch = Path(args.out) / "buckets-scratch"
    scratch.mkdir(parents=True, exist_ok=True)

    def measure(name: str) -> dict:
        out = scratch / name
        load = Path("/proc/loadavg").read_text().split()[0]
        must_succeed(run_child([sys.executable, __file__, "--texts", str(args.texts), "--precision", args.precision,
                                "--child", args.export, "1" if name == "buckets" else "0", str(out)], capture=False),
                     name)
        return {**json.loads(out.read_text()), "embeddings": np.load(str(out) + ".npy"), "load": load}

    results = alternating_rounds(["buckets", "no buckets"], args.rounds, measure)
    report = Report(f"OpenVINO cold vs warm passes ({args.label}, {args.precision} hint, batch 32, "
                    f"{args.texts} real texts)")
    reference = results["no buckets"][0]["embeddings"]
    for name, runs in results.items():
        passes = [statistics.median(r["rates"][i] for r in runs) for i in range(3)]
        report.rows.append({
            "contender": name, "pass1": passes[0], "pass2": passes[1], "pass3": passes[2],
            "cold_over_warm": passes[0] / statistics.median(passes[1:]), "distinct_shapes": runs[0]["shapes"],
            "max_diff": float(max(np.abs(r["embeddings"] - reference).max() for r in runs)),
            "load": " ".join(r["load"] for r in runs)})
    report.notes.append(f"{args.rounds} rounds, each setting in a fresh process, order alternated; medians per pass; "
                        "load avg = 1-minute load when each run started (it shows whether anything else ran)")
    md = report.write(Path(args.out), "bench_openvino_buckets", COLUMNS)
    print(md.read_text())
    return 0 if report.rows[0]["max_diff"] <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
