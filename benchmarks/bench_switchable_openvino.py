"""Switchable OpenVINO IR vs merged OpenVINO IRs, on all-MiniLM-L6-v2 with the adapters of bench_switchable.py.

Exports one switchable IR holding the three adapters (r=8 on query/key/value/all dense, r=16 on query/value, r=32
rsLoRA on the feed-forward layers), one merged IR per adapter and the base IR (f32 weights; the runtime's default
f32 precision hint), checks that each adapter through the switchable IR equals its merged IR within 1e-5 (no
adapter: the base IR), then measures batch-1 latency (p50 over short real queries) and batch-32 throughput in
alternating blocks (``peft_export.bench.switchable.compare``), wall clock and process CPU time.

    python benchmarks/bench_switchable_openvino.py [--workdir DIR] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from peft_export.bench.machine import machine_info
from peft_export.bench.report import write_report
from peft_export.bench.switchable import ADAPTERS, compare, make_adapters
from peft_export.bench.texts import demo_queries_and_sentences

BASE = "no adapter"


def build(workdir: Path, log) -> dict[str, Path]:
    """{adapter name or BASE: merged IR folder} plus "switchable": the IR with every adapter."""
    from peft_export import export_openvino_model

    sources = make_adapters(workdir)
    base = str(sources["base"])
    paths = {"switchable": workdir / "switchable-ov", BASE: workdir / "merged-ov-base"}
    if not paths[BASE].is_dir():
        log("exporting the base IR ...")
        export_openvino_model(base, paths[BASE], log=lambda m: None)
    for name in ADAPTERS:
        paths[name] = workdir / f"merged-ov-{name}"
        if not paths[name].is_dir():
            log(f"exporting merged {name} ...")
            export_openvino_model(str(sources[f"adapter-{name}"]), paths[name], base=base, log=lambda m: None)
    if not paths["switchable"].is_dir():
        log("exporting switchable ...")
        export_openvino_model(base, paths["switchable"], switchable=True, log=lambda m: None,
                              adapters=[f"{n}={sources[f'adapter-{n}']}" for n in ADAPTERS])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="folder for adapters and exports (default: a new temporary folder)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--sentences", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="OpenVINO inference threads (default: all)")
    parser.add_argument("--out", default="bench-results", help="folder for the JSON and Markdown reports")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-switchable-openvino-"))
    workdir.mkdir(parents=True, exist_ok=True)

    from peft_export import EmbeddingModel

    paths = build(workdir, print)
    queries, sentences = demo_queries_and_sentences(args.queries, args.sentences, cycle=True)
    switchable = EmbeddingModel(paths["switchable"], intra_op_threads=args.threads)
    names = [BASE, *ADAPTERS]
    merged = {name: EmbeddingModel(paths[name], intra_op_threads=args.threads) for name in names}
    calls = {name: False if name == BASE else name for name in names}  # encode(adapter=...) for each row
    diffs = {}
    for name, call in calls.items():
        diffs[name] = float(np.abs(switchable.encode(sentences, adapter=call) - merged[name].encode(sentences)).max())
        if diffs[name] > 1e-5:
            print(f"FAIL: the switchable IR with {name} differs from its merged IR by {diffs[name]:.2g}",
                  file=sys.stderr)
            return 1
    runs = {}
    for name, call in calls.items():
        runs[f"merged {name}"] = lambda t, b, m=merged[name]: m.encode(t, batch_size=b)
        runs[f"switchable {name}"] = lambda t, b, c=call: switchable.encode(t, batch_size=b, adapter=c)
    result = compare(runs, queries, sentences, args.rounds)
    rows = {}
    for name in names:
        ours, theirs = result[f"switchable {name}"], result[f"merged {name}"]
        rows[name] = {"b1_overhead_pct": 100 * (ours["b1_wall"]["p50_ms"] / theirs["b1_wall"]["p50_ms"] - 1),
                      "b32_lower_pct": 100 * (1 - ours["b32_per_s"] / theirs["b32_per_s"])}
    report = {"title": "Switchable OpenVINO IR vs merged OpenVINO IRs (all-MiniLM-L6-v2)", "machine": machine_info(),
              "settings": vars(args) | {"workdir": str(workdir)}, "max_abs_diff": diffs,
              "runtime": switchable.backend.describe(), "results": result, "overhead": rows}
    lines = ["| adapter | merged IR b1 p50 | switchable b1 p50 | b1 overhead | merged IR b32 | switchable b32 | "
             "b32 lower by | max diff |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        ours, theirs = result[f"switchable {name}"], result[f"merged {name}"]
        lines.append(f"| {name} | {theirs['b1_wall']['p50_ms']:.2f} ms | {ours['b1_wall']['p50_ms']:.2f} ms | "
                     f"{rows[name]['b1_overhead_pct']:+.1f}% | {theirs['b32_per_s']:.0f} /s | "
                     f"{ours['b32_per_s']:.0f} /s | {rows[name]['b32_lower_pct']:.1f}% | {diffs[name]:.1e} |")
    print(write_report(Path(args.out), "bench_switchable_openvino", report, "\n".join(lines) + "\n").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
