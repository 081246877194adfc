"""The full contender table on all-MiniLM-L6-v2 + the demo adapter, in one run on this machine.

Contenders: eager sentence-transformers + PEFT adapter unmerged (the reference), eager merged, and every export
variant that can be built here: ONNX Runtime fp32 and int8, and with openvino installed OpenVINO f32, bf16 (where
the CPU has it), int8 weights and static int8 (weights and activations); all from one PEFT merge.

    python benchmarks/bench_suite.py            # full run (several minutes on 2 cores)
    python benchmarks/bench_suite.py --quick    # smoke run, under 2 minutes once the exports exist
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peft_export.bench.builders import OPENVINO_VARIANTS, merged_variants
from peft_export.bench.suite import (
    COLUMNS, Workload, eager_contender, linear_flops_per_token, openvino_contenders, plot, run_suite, runtime_contender,
)
from peft_export.runtime.onnxruntime_backend import SessionSettings


def variants(device: str) -> list[str]:
    """The exports this installation can build for ``device``: ONNX fp32 and int8 (fp16 on CUDA), and with openvino
    installed the OpenVINO ones (CPU only)."""
    if device == "cuda":
        return ["onnx-fp32", "onnx-fp16"]
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("openvino is not installed: no OpenVINO contenders", flush=True)
        return ["onnx-fp32", "onnx-int8"]
    return ["onnx-fp32", "onnx-int8", *OPENVINO_VARIANTS]


def main(argv: list[str] | None = None) -> int:
    from peft_export.demo import DEMO_ADAPTER_DIR, bundled_base_model_path, load_pairs, load_sentences
    from peft_export.runtime.model import EmbeddingModel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base Sentence Transformers folder (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--adapter", default=str(DEMO_ADAPTER_DIR))
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--rebuild", action="store_true", help="re-export even if cached exports exist")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: eager PyTorch on the GPU vs the CUDA execution provider with fp32 and fp16 graphs")
    args = parser.parse_args(argv)
    base = args.base or str(bundled_base_model_path())
    out = Path(args.out)
    if args.device == "cuda":
        import onnxruntime
        import torch

        if not torch.cuda.is_available() or "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            print("--device cuda needs a GPU with torch CUDA and onnxruntime-gpu (pip install 'peft_export[gpu]')",
                  file=sys.stderr)
            return 2
    exports = merged_variants(base, args.adapter, out / "exports", variants(args.device), args.rebuild)

    sentences = load_sentences(1000)
    queries = [p["query"] for p in load_pairs("eval")][:300]
    pairs = load_pairs("eval")
    workload = (Workload(queries[:50], sentences[:200], pairs[:100], (32,), 1, False) if args.quick
                else Workload(queries, sentences, pairs))

    if args.device == "cuda":
        return _gpu_suite(base, args.adapter, exports, workload, out)
    contenders = [eager_contender(base, args.adapter), eager_contender(base, args.adapter, merged=True)]
    for name in ("onnx-fp32", "onnx-int8"):
        contenders.append(runtime_contender(exports[name], name=f"ONNX Runtime {name[5:]}"))
        # Threads that sleep between operators: for processes where several sessions run at the same time.
        contenders.append(runtime_contender(exports[name], name=f"ONNX Runtime {name[5:]}, spinning off",
                                            session_settings=SessionSettings.throughput()))
    if "openvino-fp32" in exports:
        contenders += openvino_contenders(exports)
    probe = EmbeddingModel(exports["onnx-fp32"])
    report = run_suite(
        contenders, workload, lambda texts: sum(probe._tokenizer.count_tokens(texts)),
        linear_flops_per_token(exports["onnx-fp32"] / "model.onnx"),
        title="all-MiniLM-L6-v2 + demo LoRA adapter: peft_export vs eager PyTorch",
    )
    md = report.write(out, "bench_suite", COLUMNS)
    plot(report, out / "bench_suite.png")
    print(md.read_text())
    fp32 = next(r for r in report.rows if r["contender"] == "ONNX Runtime fp32")
    if fp32["worst_cosine"] < 0.99999:
        print("FAIL: the fp32 export disagrees with eager PyTorch", file=sys.stderr)
        return 1
    return 0


def _gpu_suite(base: str, adapter: str, exports: dict[str, Path], workload: Workload, out: Path) -> int:
    """The same workloads on CUDA: eager PyTorch on the GPU vs the CUDA execution provider, fp32 and fp16."""
    contenders = [eager_contender(base, adapter, device="cuda"), eager_contender(base, adapter, merged=True,
                                                                                   device="cuda")]
    contenders += [runtime_contender(exports[name], name=f"ONNX Runtime CUDA {name[5:]}", device="cuda")
                   for name in ("onnx-fp32", "onnx-fp16")]
    from peft_export.runtime.model import EmbeddingModel

    workload.cold_start = False
    probe = EmbeddingModel(exports["onnx-fp32"])
    report = run_suite(
        contenders, workload, lambda texts: sum(probe._tokenizer.count_tokens(texts)), None,
        title="all-MiniLM-L6-v2 + demo LoRA adapter on CUDA: peft_export vs eager PyTorch",
    )
    md = report.write(out, "bench_suite_cuda", COLUMNS)
    plot(report, out / "bench_suite_cuda.png")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
