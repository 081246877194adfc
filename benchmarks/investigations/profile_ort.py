"""Per-operator time of an export under ONNX Runtime's profiler, to see what limits a speed target.

    python benchmarks/investigations/profile_ort.py EXPORT [EXPORT ...] [--batch-size 32] [--sentences 256]

Prints, per export, the share of kernel time by operator type (MatMul, Attention, LayerNorm, ...) and the
time spent outside kernels (tokenization and Python), measured on real sentences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from peft_export.bench.texts import demo_queries_and_sentences


def profile(path: Path, sentences: list[str], batch_size: int) -> dict:
    import onnxruntime as ort

    from peft_export import EmbeddingModel

    model = EmbeddingModel(path)
    model.encode(sentences[:batch_size], batch_size=batch_size)  # warm-up, unprofiled
    options = model.backend.settings.to_session_options(ort)
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    model.backend.session = ort.InferenceSession(
        str(path / model.config.model_file), options, providers=model.backend.providers,
        disabled_optimizers=model.backend.settings.disabled_optimizers(model.backend.providers))
    start = time.perf_counter()
    model.encode(sentences, batch_size=batch_size)
    wall = time.perf_counter() - start
    trace = json.loads(Path(model.backend.session.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 1e6
    kernels = sum(by_op.values())
    return {"export": str(path), "wall_s": wall, "kernel_s": kernels, "outside_kernels_s": wall - kernels,
            "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--queries", action="store_true",
                        help="profile short real queries (the batch-1 latency workload) instead of mixed sentences")
    args = parser.parse_args(argv)
    queries, sentences = demo_queries_and_sentences(args.sentences, args.sentences)
    if args.queries:
        sentences = queries
    for path in args.exports:
        result = profile(path, sentences, args.batch_size)
        print(f"## {path} (batch {args.batch_size}, {len(sentences)} sentences)")
        print(f"wall {result['wall_s']:.2f} s, kernels {result['kernel_s']:.2f} s, "
              f"outside kernels {result['outside_kernels_s']:.2f} s")
        for op, seconds in list(result["by_op"].items())[:10]:
            print(f"  {op:28s} {seconds:7.3f} s  {seconds / result['kernel_s']:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
