"""Switchable OpenVINO IR vs the merged OpenVINO IR, on the demo model (all-MiniLM-L6-v2 + the bundled demo LoRA).

Exports both (f32 weights; the runtime's default f32 precision hint), checks that the switchable IR with the
demo adapter equals the merged IR within 1e-5, then measures batch-1 latency (p50 over short real queries) and
batch-32 throughput in alternating blocks (``bench_switchable.compare``), wall clock and process CPU time.

    python benchmarks/bench_switchable_openvino.py [--workdir DIR] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_switchable import compare, load_texts

from peft_export.benchmark.harness import machine_info


def build(workdir: Path) -> dict[str, Path]:
    from peft_export import export_openvino_model
    from peft_export.demo import DEMO_ADAPTER_DIR, bundled_base_model_path

    base = str(bundled_base_model_path())
    paths = {"merged": workdir / "merged-ov", "switchable": workdir / "switchable-ov"}
    if not paths["merged"].is_dir():
        export_openvino_model(str(DEMO_ADAPTER_DIR), paths["merged"], base=base, log=print)
    if not paths["switchable"].is_dir():
        export_openvino_model(base, paths["switchable"], adapters=[f"demo={DEMO_ADAPTER_DIR}"], switchable=True,
                              log=print)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="folder for the exports (default: a new temporary folder)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--sentences", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="OpenVINO inference threads (default: all)")
    parser.add_argument("--out", default="bench-results", help="folder for the JSON report")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-switchable-openvino-"))
    workdir.mkdir(parents=True, exist_ok=True)

    from peft_export import EmbeddingModel

    paths = build(workdir)
    queries, sentences = load_texts(args.queries, args.sentences)
    merged = EmbeddingModel(paths["merged"], intra_op_threads=args.threads)
    switchable = EmbeddingModel(paths["switchable"], intra_op_threads=args.threads)
    diff = float(np.abs(switchable.encode(sentences, adapter="demo") - merged.encode(sentences)).max())
    if diff > 1e-5:
        print(f"FAIL: the switchable IR with the demo adapter differs from the merged IR by {diff:.2g}",
              file=sys.stderr)
        return 1
    runs = {"merged": lambda t, b: merged.encode(t, batch_size=b),
            "switchable": lambda t, b: switchable.encode(t, batch_size=b, adapter="demo"),
            "switchable-no-adapter": lambda t, b: switchable.encode(t, batch_size=b, adapter=False)}
    result = compare(runs, queries, sentences, args.rounds)
    report = {"title": "Switchable OpenVINO IR vs merged OpenVINO IR (demo model)", "machine": machine_info(),
              "settings": vars(args) | {"workdir": str(workdir)}, "max_abs_diff": diff,
              "runtime": switchable.backend.describe(), "results": result}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_switchable_openvino.json").write_text(json.dumps(report, indent=2))
    base = result["merged"]
    print(f"switchable == merged within {diff:.2g}")
    for name, r in result.items():
        print(f"{name:24s} b1 p50 {r['b1_wall']['p50_ms']:.2f} ms ({r['b1_cpu_ms']:.2f} ms CPU), "
              f"b32 {r['b32_per_s']:.0f} /s ({r['b32_per_cpu_s']:.0f} /CPU-s); vs merged: b1 "
              f"{100 * (r['b1_wall']['p50_ms'] / base['b1_wall']['p50_ms'] - 1):+.1f}%, b32 "
              f"{100 * (1 - r['b32_per_s'] / base['b32_per_s']):+.1f}% lower")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
