"""Decoder-size speed: eager sentence-transformers + PEFT against exports of a Qwen3-Embedding-0.6B-sized model.

Build the model first (random weights, Qwen3-Embedding-0.6B's published dimensions, LoRA r=16 on all seven
projections): ``python benchmarks/build_decoder_model.py --out /tmp/q06``; export it as you want to compare, e.g.

    peft-export merge-onnx /tmp/q06/adapter --base /tmp/q06/st -o /tmp/q06-onnx
    peft-export merge-openvino /tmp/q06/adapter --base /tmp/q06/st -o /tmp/q06-ov
    peft-export merge-openvino /tmp/q06/adapter --base /tmp/q06/st -o /tmp/q06-ov-int8 --weight-format int8
    python benchmarks/bench_decoder.py --model /tmp/q06 --contender "ORT fp32=/tmp/q06-onnx" \\
        --contender "OpenVINO f32=/tmp/q06-ov" --contender "OpenVINO bf16=/tmp/q06-ov@bf16" \\
        --contender "OpenVINO int8 weights=/tmp/q06-ov-int8"

Every contender runs in its own process (batch-1 latency over the first --queries texts, then throughput at
batch 32 over all --texts real texts from the demo corpus; peak RSS from peft_export.bench.child), the order
reversed every other round; the table gives medians over rounds, ratios to eager, folder size, and the cosine of
each contender's embeddings to the first export contender's (the fp32 reference). The 1-minute load average is
recorded with every run: other jobs may share the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from peft_export.bench.child import must_succeed, run_child
from peft_export.bench.report import Report
from peft_export.bench.rounds import alternating_rounds
from peft_export.runtime.similarity import cosine_rows
from peft_export.bench.texts import corpus_texts
from peft_export.bench.timing import time_single_queries

COLUMNS = [("contender", "contender", ""), ("b1_ms", "batch 1 p50 ms", ".1f"), ("b1_speedup", "b1 x eager", ".2f"),
           ("b32_per_s", "batch 32 texts/s", ".2f"), ("b32_speedup", "b32 x eager", ".2f"),
           ("peak_rss_mb", "peak RSS MB", ".0f"), ("rss_vs_eager", "RSS / eager", ".2f"),
           ("folder_mb", "folder MB", ".0f"), ("mean_cosine", "mean cos to fp32", ".6f"),
           ("worst_cosine", "worst cos", ".6f"), ("load", "load avg per round", "")]


def child(spec: str, model_dir: str, texts: int, queries: int, out: str) -> None:
    """Load one contender, time it, save embeddings and figures to ``out``."""
    sentences = corpus_texts(texts, passage_first=True)
    if spec == "eager":
        import torch
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(Path(model_dir) / "st"), device="cpu")
        model.load_adapter(str(Path(model_dir) / "adapter"))

        def encode(batch: list[str], size: int) -> np.ndarray:
            with torch.inference_mode():
                return model.encode(batch, batch_size=size)
    else:
        from peft_export import EmbeddingModel

        path, _, precision = spec.partition("@")
        model = EmbeddingModel(path, **({"inference_precision": precision} if precision else {}))

        def encode(batch: list[str], size: int) -> np.ndarray:
            return model.encode(batch, batch_size=size)

    encode(sentences[:2], 2)  # warm-up
    b1 = time_single_queries(lambda text: encode([text], 1), sentences[:queries], warmup=0)
    start = time.perf_counter()
    embeddings = encode(sentences, 32)
    rate = len(sentences) / (time.perf_counter() - start)
    np.save(out + ".npy", embeddings)
    Path(out).write_text(json.dumps({"b1_ms": b1["p50_ms"], "b32_per_s": rate}))


def folder_mb(spec: str) -> float | None:
    if spec == "eager":
        return None
    folder = Path(spec.partition("@")[0])
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder from build_decoder_model.py (st/ and adapter/)")
    parser.add_argument("--contender", action="append", default=[], metavar="NAME=FOLDER[@PRECISION]")
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--queries", type=int, default=16, help="texts timed one at a time (batch 1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.model, args.texts, args.queries, args.child[1])
        return 0
    specs = {} if args.no_eager else {"eager sentence-transformers + PEFT": "eager"}
    specs.update(dict(c.split("=", 1) for c in args.contender))
    scratch = Path(args.out) / "decoder-scratch"
    scratch.mkdir(parents=True, exist_ok=True)

    def measure(name: str) -> dict:
        out = str(scratch / f"{len(list(scratch.iterdir()))}")
        load = Path("/proc/loadavg").read_text().split()[0]
        command = [sys.executable, __file__, "--model", args.model, "--texts", str(args.texts), "--queries",
                   str(args.queries), "--child", specs[name], out]
        done = must_succeed(run_child(command, capture=False), name)
        return {**json.loads(Path(out).read_text()), "peak_rss_mb": done["peak_rss_mb"],
                "embeddings": np.load(out + ".npy"), "load": load}

    results = alternating_rounds(list(specs), args.rounds, measure)
    report = Report(f"Qwen3-Embedding-0.6B-sized model + LoRA r=16 (7 projections), {args.texts} real texts")
    exports = [n for n in specs if specs[n] != "eager"]
    reference = results[exports[0]][0]["embeddings"] if exports else None
    eager = {k: statistics.median(r[k] for r in results[n]) for n in specs if specs[n] == "eager"
             for k in ("b1_ms", "b32_per_s", "peak_rss_mb")}
    for name, runs in results.items():
        row = {"contender": name, "spec": specs[name], "folder_mb": folder_mb(specs[name]),
               "load": " ".join(r["load"] for r in runs)}
        for key in ("b1_ms", "b32_per_s", "peak_rss_mb"):
            row[key] = statistics.median(r[key] for r in runs)
        if eager:
            row.update(b1_speedup=eager["b1_ms"] / row["b1_ms"], b32_speedup=row["b32_per_s"] / eager["b32_per_s"],
                       rss_vs_eager=row["peak_rss_mb"] / eager["peak_rss_mb"])
        if reference is not None:
            cos = cosine_rows(runs[0]["embeddings"], reference)
            row.update(mean_cosine=float(cos.mean()), worst_cosine=float(cos.min()))
        report.rows.append(row)
    report.notes += [f"{args.rounds} rounds, each contender in a fresh process, order reversed every other round; "
                     f"batch 1 = median over {args.queries} texts; batch 32 = one pass over {args.texts} texts",
                     f"cosine against {exports[0] if exports else '-'}; command: {' '.join(sys.argv)}"]
    md = report.write(Path(args.out), "bench_decoder", COLUMNS)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
