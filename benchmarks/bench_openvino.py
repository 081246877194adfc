"""OpenVINO rows for all-MiniLM-L6-v2 + a LoRA adapter, against eager PyTorch in the same run.

Contenders: eager sentence-transformers with the PEFT adapter unmerged (the reference for every ratio and for
quality), ONNX Runtime f32 (context), OpenVINO f32, OpenVINO bf16 (only where the CPU reports BF16), and
OpenVINO with NNCF int8 weights, computed in f32 and, where the CPU has bf16, in bf16 with OpenVINO's dynamic
quantization, and OpenVINO with NNCF static int8 (weights and activations, ``merge-openvino --quantize
int8-static``) under both precision hints. Workloads and columns are the benchmark suite's
(peft_export.benchmark.suite): batch-1 latency over short real queries, batch-32 throughput over real sentences
of mixed lengths, mean/worst cosine and NDCG@10 retention against eager fp32.

    python benchmarks/bench_openvino.py             # full run: 300 queries, 1000 sentences, 3 passes
    python benchmarks/bench_openvino.py --quick     # smoke run

``openvino_contenders`` and ``build_exports`` are importable by a larger benchmark script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peft_export.benchmark.suite import Contender, Workload, eager_contender, linear_flops_per_token, plot, run_suite
from peft_export.benchmark.suite import runtime_contender

COLUMNS = [
    ("contender", "contender", ""),
    ("b1_p50_ms", "b1 p50 ms", ".2f"),
    ("b1_p95_ms", "b1 p95 ms", ".2f"),
    ("b1_speedup", "b1 speed-up", ".2f"),
    ("b32_per_s", "b32 sent/s", ".1f"),
    ("b32_speedup", "b32 ratio", ".2f"),
    ("tokens_per_s", "tokens/s (b32)", ".0f"),
    ("cold_start_s", "cold start s", ".2f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
    ("mean_cosine", "mean cos", ".6f"),
    ("worst_cosine", "worst cos", ".6f"),
    ("ndcg10_retention", "NDCG@10 ret.", ".4f"),
]
EXACT = ("ONNX Runtime f32", "OpenVINO f32")  # rows that must reproduce eager fp32


def cpu_has_bf16() -> bool:
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def build_exports(base: str, adapter: str, folder: Path, rebuild: bool = False, log=print) -> dict[str, Path]:
    """One merge written four ways (ONNX fp32, OpenVINO fp32, int8 weights, static int8); reused unless rebuild."""
    from peft_export.export.onnx import OnnxFormat
    from peft_export.export.openvino import OpenVinoFormat
    from peft_export.export.pipeline import ExportOptions, merge_and_reference, write_export

    def options(name: str) -> ExportOptions:
        return ExportOptions(model_id=adapter, output=folder / name, base=base, force=True,
                             quantize="int8-static" if name == "openvino-int8-static" else None)

    formats = {"onnx-fp32": lambda: OnnxFormat(options("onnx-fp32")),
               "openvino-fp32": lambda: OpenVinoFormat("fp32", options("openvino-fp32")),
               "openvino-int8": lambda: OpenVinoFormat("int8", options("openvino-int8")),
               "openvino-int8-static": lambda: OpenVinoFormat("fp32", options("openvino-int8-static"))}
    todo = [name for name in formats if rebuild or not (folder / name / "peft_export.json").is_file()]
    if todo:
        merged = merge_and_reference(options("unused"), log=lambda msg: None)
        for name in todo:
            log(f"exporting {name} ...")
            write_export(merged, options(name), formats[name](), log=lambda msg: None)
    return {name: folder / name for name in formats}


def openvino_contenders(exports: dict[str, Path], bf16: bool | None = None) -> list[Contender]:
    """OpenVINO f32, bf16 (if the CPU has it), int8 weights and static int8, each in f32 and (with bf16) in bf16."""
    bf16 = cpu_has_bf16() if bf16 is None else bf16
    rows = [runtime_contender(exports["openvino-fp32"], name="OpenVINO f32")]
    if bf16:
        rows.append(runtime_contender(exports["openvino-fp32"], name="OpenVINO bf16", inference_precision="bf16"))
    rows.append(runtime_contender(exports["openvino-int8"], name="OpenVINO int8 weights, f32"))
    if bf16:
        rows.append(runtime_contender(exports["openvino-int8"], name="OpenVINO int8 weights, bf16",
                                      inference_precision="bf16"))
    if "openvino-int8-static" in exports:
        rows.append(runtime_contender(exports["openvino-int8-static"], name="OpenVINO int8 static, f32"))
        if bf16:
            rows.append(runtime_contender(exports["openvino-int8-static"], name="OpenVINO int8 static, bf16",
                                          inference_precision="bf16"))
    return rows


def load_workload(quick: bool, queries: int, sentences: int) -> tuple[Workload, str]:
    """The demo corpus where this installation has it, else pairs from the standard library's docstrings."""
    try:
        from peft_export.demo import load_pairs, load_sentences

        pairs = load_pairs("eval")
        texts, source = load_sentences(sentences), "demo corpus"
    except ImportError:
        from peft_export.export.quality import docstring_pairs

        pairs = docstring_pairs(max(500, sentences // 2))
        texts = [t for p in pairs for t in (p["query"], p["passage"])][:sentences]
        source = "standard-library docstrings"
    short = [p["query"] for p in pairs][:queries]
    if quick:
        return Workload(short[:50], texts[:200], pairs[:100], batch_sizes=(32,), repeats=1, cold_start=False), source
    return Workload(short, texts, pairs, batch_sizes=(32,), repeats=3, cold_start=True), source


def main(argv: list[str] | None = None) -> int:
    from peft_export.demo import DEMO_ADAPTER_DIR, bundled_base_model_path
    from peft_export.runtime.model import EmbeddingModel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base Sentence Transformers folder (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--adapter", default=str(DEMO_ADAPTER_DIR), help="PEFT adapter (default: the demo adapter)")
    parser.add_argument("--out", default="bench-results", help="reports and cached exports go here")
    parser.add_argument("--queries", type=int, default=300, help="short queries timed at batch 1")
    parser.add_argument("--sentences", type=int, default=1000, help="sentences per throughput pass")
    parser.add_argument("--rebuild", action="store_true", help="re-export even if cached exports exist")
    parser.add_argument("--quick", action="store_true", help="smoke run: 50 queries, 200 sentences, one pass")
    args = parser.parse_args(argv)
    base = args.base or str(bundled_base_model_path())
    out = Path(args.out)
    exports = build_exports(base, args.adapter, out / "openvino-exports", args.rebuild)
    workload, source = load_workload(args.quick, args.queries, args.sentences)

    contenders = [eager_contender(base, args.adapter),
                  runtime_contender(exports["onnx-fp32"], name="ONNX Runtime f32")]
    contenders += openvino_contenders(exports)
    probe = EmbeddingModel(exports["onnx-fp32"])
    report = run_suite(contenders, workload, lambda texts: sum(probe._tokenizer.count_tokens(texts)),
                       linear_flops_per_token(exports["onnx-fp32"] / "model.onnx"),
                       title="all-MiniLM-L6-v2 + LoRA adapter: OpenVINO vs eager PyTorch")
    report.notes.append(f"texts: {source}; OpenVINO runs with the LATENCY hint and all cores; 'f32' rows use the "
                        "f32 precision hint (OpenVINO's CPU default would be bf16 on this machine)")
    md = report.write(out, "bench_openvino", COLUMNS)
    plot(report, out / "bench_openvino.png")
    print(md.read_text())
    wrong = [r["contender"] for r in report.rows if r["contender"] in EXACT and r["worst_cosine"] < 0.99999]
    wrong += [r["contender"] for r in report.rows if r["mean_cosine"] < 0.99]
    if wrong:
        print(f"FAIL: {', '.join(wrong)} disagree with eager PyTorch; the timings are of a wrong model",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
