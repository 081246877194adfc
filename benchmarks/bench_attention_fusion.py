"""Fused against unfused attention: the same merged ONNX export with and without ``merge-onnx``'s attention
fusion (``--no-fuse-attention``), each timed in its own process, rounds alternating, medians over rounds.

Per pair: nodes in each graph and the fused operators, batch-1 p50 over short real queries, batch-32 sentences/s
over real sentences (``EmbeddingModel.encode``, default session settings), and the largest difference between the
two exports' embeddings on those sentences (checked before the timings are reported: over 1e-5 fails the run).

    # export a pair from a model and adapter, then time it
    python benchmarks/bench_attention_fusion.py --export mpnet=/work/models/mpnet-lora-r16 \\
        --base /work/models/all-mpnet-base-v2 --workdir /tmp/fusion-bench
    # or time pairs exported already (fused folder, unfused folder)
    python benchmarks/bench_attention_fusion.py --pair mpnet=/tmp/mpnet-fused,/tmp/mpnet-unfused
    python benchmarks/bench_attention_fusion.py --pair ... --quick     # smoke run: 20 queries, 64 sentences, 1 round

The real-size rows use random weights at the published dimensions (speed only), e.g. ModernBERT-base:

    python benchmarks/build_encoder_model.py --family modernbert --out M/modernbert-base   # or xlm-roberta
    python benchmarks/build_decoder_model.py --out M/qwen3-0.6b                            # Qwen3-Embedding-0.6B
    python -m peft_export.cli merge-onnx M/modernbert-base/adapter --base M/modernbert-base/st -o M/mb-fused
    python -m peft_export.cli merge-onnx M/modernbert-base/adapter --base M/modernbert-base/st -o M/mb-unfused \
        --no-fuse-attention
    python benchmarks/bench_attention_fusion.py --pair modernbert-base=M/mb-fused,M/mb-unfused
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from peft_export.bench.builders import onnx_export
from peft_export.bench.child import run_child
from peft_export.bench.report import Report
from peft_export.bench.rounds import alternating_rounds
from peft_export.bench.texts import demo_queries_and_sentences

ATOL = 1e-5
COLUMNS = [
    ("family", "export", ""),
    ("fused_ops", "fused operators", ""),
    ("nodes", "nodes fused / unfused", ""),
    ("b1_fused_ms", "b1 p50 ms fused", ".2f"),
    ("b1_unfused_ms", "b1 p50 ms unfused", ".2f"),
    ("b1_gain", "b1 gain", ".2f"),
    ("b32_fused", "b32 /s fused", ".1f"),
    ("b32_unfused", "b32 /s unfused", ".1f"),
    ("b32_gain", "b32 gain", ".2f"),
    ("max_diff", "max diff fused vs unfused", ".1e"),
]

# Runs in a fresh interpreter per measurement: one export, one session, nothing else in the process.
_WORKER = """
import json, sys
import numpy as np
from peft_export import EmbeddingModel
from peft_export.bench.timing import time_single_queries, time_throughput
folder, texts_file, out_file = sys.argv[1:4]
texts = json.loads(open(texts_file).read())
model = EmbeddingModel(folder)
np.save(out_file, model.encode(texts["sentences"], batch_size=32))
b1 = time_single_queries(lambda q: model.encode(q), texts["queries"])
b32 = time_throughput(lambda s: model.encode(s, batch_size=32), texts["sentences"])
print(json.dumps({"b1_p50_ms": b1["p50_ms"], "b32_per_s": b32["sentences_per_s"]}))
"""


def export_pair(name: str, adapter: str, base: str | None, workdir: Path) -> tuple[Path, Path]:
    fused, unfused = workdir / f"{name}-fused", workdir / f"{name}-unfused"
    for out, fuse in ((fused, True), (unfused, False)):
        onnx_export(adapter, out, base=base, fuse_attention=fuse)
    return fused, unfused


def graph_summary(folder: Path) -> tuple[int, str]:
    import onnx

    config = json.loads((folder / "embedding_config.json").read_text())
    ops = collections.Counter(n.op_type for n in onnx.load(str(folder / config["model_file"]),
                                                            load_external_data=False).graph.node)
    fused = ", ".join(f"{ops[op]} {op}" for op in ("Attention", "MultiHeadAttention") if ops[op]) or "none"
    return sum(ops.values()), fused


def measure(folder: Path, texts_file: Path, out_file: Path) -> dict:
    done = run_child([sys.executable, "-c", _WORKER, str(folder), str(texts_file), str(out_file)])
    if done["rc"]:
        raise RuntimeError(f"timing {folder} failed:\n{done['stderr']}")
    return json.loads(done["stdout"].strip().splitlines()[-1])


def bench_pair(name: str, fused: Path, unfused: Path, texts_file: Path, rounds: int, scratch: Path) -> dict:
    folders = {"fused": fused, "unfused": unfused}
    results = alternating_rounds(list(folders), rounds,
                                 lambda which: measure(folders[which], texts_file, scratch / f"{name}-{which}.npy"))
    diff = float(np.abs(np.load(scratch / f"{name}-fused.npy") - np.load(scratch / f"{name}-unfused.npy")).max())
    if diff > ATOL:
        raise SystemExit(f"{name}: fused and unfused embeddings differ by {diff:.2e} (> {ATOL:g}); not timed")
    med = {which: {key: statistics.median(r[key] for r in runs) for key in ("b1_p50_ms", "b32_per_s")}
           for which, runs in results.items()}
    (nodes_fused, fused_ops), (nodes_unfused, _) = graph_summary(fused), graph_summary(unfused)
    return {"family": name, "fused_ops": fused_ops, "nodes": f"{nodes_fused} / {nodes_unfused}",
            "b1_fused_ms": med["fused"]["b1_p50_ms"], "b1_unfused_ms": med["unfused"]["b1_p50_ms"],
            "b1_gain": med["unfused"]["b1_p50_ms"] / med["fused"]["b1_p50_ms"],
            "b32_fused": med["fused"]["b32_per_s"], "b32_unfused": med["unfused"]["b32_per_s"],
            "b32_gain": med["fused"]["b32_per_s"] / med["unfused"]["b32_per_s"], "max_diff": diff,
            "rounds": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", action="append", default=[], metavar="NAME=FUSED,UNFUSED",
                        help="two export folders of the same model, fused and --no-fuse-attention (repeatable)")
    parser.add_argument("--export", action="append", default=[], metavar="NAME=ADAPTER",
                        help="export the pair first with merge-onnx (repeatable; --base applies to all)")
    parser.add_argument("--base", help="base model for --export adapters")
    parser.add_argument("--workdir", help="where --export writes its folders (default: a new temporary folder)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--sentences", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench-results", help="folder for the Markdown and JSON reports")
    parser.add_argument("--quick", action="store_true", help="20 queries, 64 sentences, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.sentences, args.rounds = 20, 64, 1
    pairs = []
    for spec in args.pair:
        name, _, folders = spec.partition("=")
        fused, _, unfused = folders.partition(",")
        if not (name and fused and unfused):
            parser.error(f"--pair expects NAME=FUSED,UNFUSED, found {spec!r}")
        pairs.append((name, Path(fused), Path(unfused)))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-fusion-"))
    for spec in args.export:
        name, _, adapter = spec.partition("=")
        if not (name and adapter):
            parser.error(f"--export expects NAME=ADAPTER, found {spec!r}")
        pairs.append((name, *export_pair(name, adapter, args.base, workdir)))
    if not pairs:
        parser.error("give at least one --pair or --export")

    queries, sentences = demo_queries_and_sentences(args.queries, args.sentences)
    report = Report("Attention fusion: fused vs unfused merged ONNX exports (one process per measurement)")
    with tempfile.TemporaryDirectory() as scratch:
        texts_file = Path(scratch) / "texts.json"
        texts_file.write_text(json.dumps({"queries": queries, "sentences": sentences}))
        for name, fused, unfused in pairs:
            report.rows.append(bench_pair(name, fused, unfused, texts_file, args.rounds, Path(scratch)))
            print(report.rows[-1], flush=True)
    report.notes.append(f"{len(queries)} queries at batch 1 (p50), {len(sentences)} sentences at batch 32 (median of "
                        f"3 passes); {args.rounds} alternating rounds, medians over rounds; gain = unfused time / "
                        "fused time")
    path = report.write(Path(args.out), "bench_attention_fusion", COLUMNS)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
