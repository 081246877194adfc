"""The benchmark suite: contenders x workloads, with quality columns, in one process and one run.

Workloads: batch-1 latency over short queries (p50/p95/p99), throughput at batch 32 and 128 over real sentences
of mixed lengths, cold start (process start to first embedding) and peak RSS in a fresh subprocess, real tokens
per second and its ratio to the machine's measured fp32 matmul rate, and agreement with the
reference contender (mean/worst cosine, NDCG@10 retention on query -> passage pairs).

Two measured ceilings go into the notes, so that a table can be read against what the machine allows: the fp32
matmul rate (batch-32 throughput is arithmetic) and the weight-read floor (batch 1 is memory traffic: each call
reads every weight once, and a short query has too few tokens to hide that behind arithmetic).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .child import run_child
from .report import Report
from ..runtime.similarity import cosine_rows
from .timing import time_single_queries, time_throughput

Encode = Callable[[list[str], int], np.ndarray]

COLUMNS = [
    ("contender", "contender", ""),
    ("b1_p50_ms", "b1 p50 ms", ".2f"),
    ("b1_p95_ms", "b1 p95 ms", ".2f"),
    ("b1_p99_ms", "b1 p99 ms", ".2f"),
    ("b1_speedup", "b1 speed-up", ".2f"),
    ("b32_per_s", "b32 sent/s", ".1f"),
    ("b32_speedup", "b32 ratio", ".2f"),
    ("b128_per_s", "b128 sent/s", ".1f"),
    ("tokens_per_s", "tokens/s (b32)", ".0f"),
    # A ratio, not a share: int8 products run faster than the fp32 peak, so an int8 graph can exceed 1.
    ("fp32_matmul_peak_ratio", "x fp32 matmul peak", ".2f"),
    ("cold_start_s", "cold start s", ".2f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
    ("mean_cosine", "mean cos", ".6f"),
    ("worst_cosine", "worst cos", ".6f"),
    ("ndcg10_retention", "NDCG@10 ret.", ".4f"),
]


@dataclass
class Contender:
    name: str
    encode: Encode
    cold_start: list[str] | None = None  # argv of a subprocess that prints cold-start JSON (see _COLD_START)
    notes: dict = field(default_factory=dict)


@dataclass
class Workload:
    queries: list[str]
    sentences: list[str]
    pairs: list[dict[str, str]]
    batch_sizes: tuple[int, ...] = (32, 128)
    repeats: int = 3
    cold_start: bool = True


# A fresh interpreter: import, load, first embedding (cold start), then a full pass (its peak RSS: run_child).
_COLD_START = r"""
import json, sys, time
t0 = float(sys.argv[1])
kind, path, extra = sys.argv[2], sys.argv[3], sys.argv[4:]
sentences = json.load(sys.stdin)
if kind == "runtime":
    from peft_export import EmbeddingModel
    kwargs = json.loads(extra[0]) if extra else {}
    if "session_settings" in kwargs:
        from peft_export.runtime.onnxruntime_backend import SessionSettings
        kwargs["session_settings"] = SessionSettings(**kwargs["session_settings"])
    model = EmbeddingModel(path, **kwargs)
else:
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(path, device="cpu")
    if extra:
        model.load_adapter(extra[0])
model.encode(["cold start"])
first = time.time() - t0
model.encode(sentences, batch_size=32)
print(json.dumps({"cold_start_s": first}))
"""


def export_variant(manifest: dict[str, Any], model_kwargs: dict[str, Any] | None = None) -> str:
    """What distinguishes an export in a table row: its arithmetic (fp32, int8, int8-static, fp16, int8 weights),
    switchable or not, and a precision other than the default asked of the runtime."""
    export = manifest.get("export", {})
    if isinstance(export.get("quantization"), dict):  # OpenVINO static int8
        variant = export["quantization"].get("mode", "int8")
    elif export.get("format") == "openvino":
        variant = f"{export.get('weight_format', 'fp32')} weights"
    else:
        dtype = export.get("dtype", "float32")
        variant = {"float32": "fp32", "float16": "fp16"}.get(dtype, dtype)
    if manifest.get("merge_mode") == "switchable":
        variant += ", switchable"
    precision = (model_kwargs or {}).get("inference_precision")
    return f"{variant}, {precision}" if precision and precision != "f32" else variant


def runtime_contender(path: str | Path, name: str | None = None, **model_kwargs) -> Contender:
    from ..runtime.model import EmbeddingModel

    model = EmbeddingModel(path, **model_kwargs)
    label = name or f"{model.backend.name} {export_variant(model.manifest, model_kwargs)} ({Path(path).name})"
    # The backend's own account of what runs (providers or devices, threads, spinning, precision) goes into the
    # JSON, so a figure can be traced to the settings it was measured with.
    return Contender(label, lambda texts, bs: model.encode(texts, batch_size=bs),
                     ["runtime", str(path), json.dumps(model_kwargs, default=asdict)],
                     {"path": str(path), "runtime": model.backend.describe()})


def eager_contender(base: str, adapter: str | None, merged: bool = False, device: str = "cpu") -> Contender:
    """sentence-transformers with the PEFT adapter loaded (unmerged), or merged into the weights with PEFT."""
    from ..export import dependencies  # noqa: F401 (torch, transformers, peft: an error naming the extra)

    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(base, device=device)
    if adapter:
        model.load_adapter(adapter)
    if merged and adapter:
        from peft.tuners.tuners_utils import BaseTunerLayer

        # transformers' PEFT integration has no merge verb; PEFT's own layer merge folds B @ A into each weight.
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(safe_merge=True)
    label = f"eager sentence-transformers{' + PEFT adapter' if adapter else ''}" + (
        " (merged)" if merged else " (unmerged)" if adapter else "") + (f" on {device}" if device != "cpu" else "")

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        with torch.inference_mode():
            return model.encode(texts, batch_size=batch_size)

    cold = None if merged or device != "cpu" else ["eager", base] + ([adapter] if adapter else [])
    return Contender(label, encode, cold, {"torch_threads": torch.get_num_threads()})


def cpu_has_bf16() -> bool:
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def openvino_contenders(exports: dict[str, Path], bf16: bool | None = None) -> list[Contender]:
    """OpenVINO f32, int8 weights and static int8 (where ``exports`` has it), each in f32 and, where the CPU has
    bf16, in bf16."""
    bf16 = cpu_has_bf16() if bf16 is None else bf16
    rows = []
    for key, label in (("openvino-fp32", "OpenVINO"), ("openvino-int8", "OpenVINO int8 weights"),
                       ("openvino-int8-static", "OpenVINO int8 static")):
        if key not in exports:
            continue
        f32 = "OpenVINO f32" if key == "openvino-fp32" else f"{label}, f32"
        rows.append(runtime_contender(exports[key], name=f32))
        if bf16:
            rows.append(runtime_contender(exports[key], name="OpenVINO bf16" if key == "openvino-fp32"
                                          else f"{label}, bf16", inference_precision="bf16"))
    return rows


def fp32_matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 GEMM rate of this process (torch when installed, else numpy), in GFLOP/s."""
    try:
        import torch

        a, b = torch.randn(size, size), torch.randn(size, size)
        mm = torch.mm
    except ImportError:
        a, b = np.random.rand(size, size).astype(np.float32), np.random.rand(size, size).astype(np.float32)
        mm = np.matmul
    mm(a, b)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            mm(a, b)
        rates.append(4 * 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return float(np.median(rates))


def read_gbs(nbytes: int, repeats: int = 7) -> float:
    """Measured rate (GB/s) at which this process reads a float32 buffer of ``nbytes`` already in memory (a sum over
    it, torch's threads when installed, else numpy on one thread): what streaming a model's weights once costs."""
    n = max(1, int(nbytes) // 4)
    try:
        import torch

        data, total = torch.ones(n), torch.sum
    except ImportError:
        data, total = np.ones(n, np.float32), np.sum
    total(data)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        total(data)
        times.append(time.perf_counter() - start)
    return 4 * n / float(np.median(times)) / 1e9


def weight_read_floor(flops_per_token: float) -> dict[str, float]:
    """The least time a batch-1 call can take in fp32: reading every linear weight once (FLOPs per token / 2
    weights of 4 bytes) at this machine's measured read rate for a buffer that size. Quantized weights read less."""
    nbytes = int(flops_per_token / 2 * 4)
    rate = read_gbs(nbytes)
    return {"fp32_weight_mb": nbytes / 1e6, "weight_read_gbs": rate, "b1_weight_read_floor_ms": nbytes / rate / 1e6}


def linear_flops_per_token(onnx_path: Path) -> float | None:
    """2 x the weights of every weight-bearing MatMul/Gemm in the graph (and of ONNX Runtime's fused Attention, whose
    weight is the packed query/key/value projection): the encoder's FLOPs per token."""
    if Path(onnx_path).suffix == ".xml":
        return _openvino_linear_flops_per_token(Path(onnx_path))
    try:
        import onnx
        from onnx import numpy_helper  # noqa: F401
    except ImportError:
        return None
    model = onnx.load(str(onnx_path), load_external_data=False)
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits",
                            "MatMulIntegerToFloat", "Attention", "QAttention"):
            for name in node.input[1:2]:
                dims = shapes.get(name)
                if dims and len(dims) == 2:
                    total += 2 * dims[0] * dims[1]
    return float(total) or None


def _openvino_linear_flops_per_token(xml_path: Path) -> float | None:
    """The same count on an OpenVINO IR: MatMuls whose second input is a static matrix (the weights)."""
    try:
        import openvino
    except ImportError:
        return None
    total = 0
    for op in openvino.Core().read_model(str(xml_path)).get_ordered_ops():
        if op.get_type_name() == "MatMul":
            shape = op.input_value(1).get_partial_shape()
            if shape.is_static and len(shape) == 2:
                total += 2 * shape[0].get_length() * shape[1].get_length()
    return float(total) or None


def _cold_start(contender: Contender, sentences: list[str]) -> dict:
    start = time.time()
    done = run_child([sys.executable, "-c", _COLD_START, repr(start), *contender.cold_start],
                     input=json.dumps(sentences), timeout=900)
    if done["rc"] != 0:
        return {"cold_start_error": done["stderr"].strip().splitlines()[-1:]}
    return {**json.loads(done["stdout"].strip().splitlines()[-1]), "peak_rss_mb": done["peak_rss_mb"]}


def run_suite(contenders: list[Contender], workload: Workload, count_tokens: Callable[[list[str]], int],
              flops_per_token: float | None, title: str, log: Callable[[str], None] = print) -> Report:
    """Time every contender on every workload; the first contender is the reference for ratios and quality."""
    from ..tasks.embedding import ndcg_at_10

    report = Report(title)
    peak = fp32_matmul_gflops()
    real_tokens = count_tokens(workload.sentences)
    report.extra.update({"fp32_matmul_gflops": peak, "flops_per_token": flops_per_token,
                         "real_tokens": real_tokens})
    if flops_per_token:
        report.extra.update(weight_read_floor(flops_per_token))
    pair_texts = [p["query"] for p in workload.pairs] + [p["passage"] for p in workload.pairs]
    n_pairs = len(workload.pairs)
    reference = reference_pairs = None
    for contender in contenders:
        log(f"benchmarking {contender.name} ...")
        row = {"contender": contender.name, **{f"note_{k}": v for k, v in contender.notes.items()}}
        embeddings = contender.encode(workload.sentences, 32)
        pair_emb = contender.encode(pair_texts, 32)
        if reference is None:
            reference, reference_pairs = embeddings, pair_emb
        cos = cosine_rows(embeddings, reference)
        row["mean_cosine"], row["worst_cosine"] = float(cos.mean()), float(cos.min())
        ref_ndcg = ndcg_at_10(reference_pairs[:n_pairs], reference_pairs[n_pairs:])
        row["ndcg10"] = ndcg_at_10(pair_emb[:n_pairs], pair_emb[n_pairs:])
        row["ndcg10_retention"] = row["ndcg10"] / ref_ndcg if ref_ndcg else None
        lat = time_single_queries(lambda q: contender.encode([q], 1), workload.queries)
        row.update({f"b1_{k}": v for k, v in lat.items() if k.endswith("ms")})
        for bs in workload.batch_sizes:
            thr = time_throughput(lambda s: contender.encode(s, bs), workload.sentences, workload.repeats)
            row[f"b{bs}_per_s"] = thr["sentences_per_s"]
        if "b32_per_s" in row:
            row["tokens_per_s"] = row["b32_per_s"] * real_tokens / len(workload.sentences)
            if flops_per_token:
                row["achieved_gflops"] = row["tokens_per_s"] * flops_per_token / 1e9
                row["fp32_matmul_peak_ratio"] = row["achieved_gflops"] / peak
        if workload.cold_start and contender.cold_start:
            row.update(_cold_start(contender, workload.sentences))
        report.rows.append(row)
    first = report.rows[0]
    for row in report.rows:
        row["b1_speedup"] = first["b1_p50_ms"] / row["b1_p50_ms"]
        if "b32_per_s" in row and "b32_per_s" in first:
            row["b32_speedup"] = row["b32_per_s"] / first["b32_per_s"]
    report.notes += [
        f"reference for ratios and quality: {first['contender']}",
        f"{len(workload.queries)} single queries (batch 1, 20 warm-up); {len(workload.sentences)} real sentences "
        f"({real_tokens} real tokens) per throughput pass, median of {workload.repeats} passes; NDCG@10 on "
        f"{n_pairs} query -> passage pairs",
        f"fp32 matmul peak measured here: {peak:.0f} GFLOP/s; encoder: "
        + (f"{flops_per_token / 1e6:.1f} MFLOP per token" if flops_per_token else "FLOPs unknown")
        + "; 'x fp32 matmul peak' is the linear layers' achieved rate over that peak: int8 graphs can pass 1.00x "
          "because their int8 products run faster than any fp32 product",
    ]
    if flops_per_token:
        floor = report.extra["b1_weight_read_floor_ms"]
        report.notes.append(
            f"batch-1 weight-read floor: every call reads the {report.extra['fp32_weight_mb']:.1f} MB of fp32 linear "
            f"weights once; this process reads a buffer that size at {report.extra['weight_read_gbs']:.0f} GB/s, "
            f"so an fp32 call takes at least {floor:.2f} ms before any arithmetic (the reference's p50 is "
            f"{first['b1_p50_ms'] / floor:.1f}x that); int8 weights read a quarter of it")
    return report


QUALITY_PANEL = "quality vs the reference (higher is better)"


def bench_figure(report: Report):
    """Three panels, one bar per contender: batch-1 p50 latency, batch-32 throughput, and quality against the
    reference (NDCG@10 retention and worst cosine). Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = [r["contender"] for r in report.rows]
    rows = range(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.6 * len(names) + 2.6), width_ratios=[1, 1, 1.1])
    for ax, key, label, spec in ((axes[0], "b1_p50_ms", "batch-1 p50 latency (ms, lower is better)", ".2f"),
                                 (axes[1], "b32_per_s", "batch-32 throughput (sentences/s, higher is better)", ".0f")):
        values = [r.get(key) or 0 for r in report.rows]
        ax.barh(rows, values, color="#4C72B0")
        ax.set_xlim(0, (max(values) or 1) * 1.3)  # room for the value labels inside the frame
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:{spec if v >= 100 else '.2f'}}", va="center", fontsize=8)
        ax.set_title(label, fontsize=10)
    quality = axes[2]
    series = (("ndcg10_retention", "NDCG@10 retention", "#55A868", -0.2),
              ("worst_cosine", "worst cosine", "#C44E52", 0.2))
    shown = [r.get(key) for key, *_ in series for r in report.rows if r.get(key) is not None]
    low, high = (min(shown), max(shown)) if shown else (0.0, 1.0)
    left = low - max(high - low, 0.01) * 0.3  # bars start left of the lowest value, so differences show
    for key, label, color, offset in series:
        values = [r.get(key) for r in report.rows]
        widths = [(v - left) if v is not None else 0 for v in values]
        quality.barh([i + offset for i in rows], widths, left=left, height=0.38, color=color, label=label)
        for i, v in enumerate(values):
            if v is not None:
                quality.text(v, i + offset, f" {v:.4f}", va="center", fontsize=7)
    quality.set_xlim(left, high + (high - left) * 0.45)
    quality.ticklabel_format(axis="x", useOffset=False)
    quality.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
    # Below the panel, so it never covers a bar or a label.
    quality.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    quality.set_title(QUALITY_PANEL, fontsize=10)
    for ax in axes:
        ax.set_yticks(rows, names if ax is axes[0] else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
    fig.suptitle(f"{report.title}\n{report.machine['cpu']}, {report.machine['usable_cores']} cores", fontsize=10)
    fig.tight_layout()
    return fig


def plot(report: Report, path: Path) -> Path | None:
    """Write :func:`bench_figure` to ``path``; None when matplotlib is not installed (the caller says so)."""
    try:
        fig = bench_figure(report)
    except ImportError:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
