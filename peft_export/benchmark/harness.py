"""Shared benchmark plumbing: machine description, timing with warm-up, percentiles, report writers.

Every script in benchmarks/ times contenders with the same functions, so their numbers are comparable.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("peft_export", "torch", "transformers", "peft", "sentence-transformers", "onnxruntime",
                 "onnxruntime-gpu", "openvino", "numpy", "tokenizers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "date_unix": int(time.time()),
    }


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()), "mean_ms": float(ms.mean()),
            "n": int(len(ms))}


def time_single_queries(encode_one: Callable[[str], Any], queries: list[str], warmup: int = 20) -> dict[str, float]:
    """Batch-1 latency: each query encoded alone, after ``warmup`` untimed calls."""
    for q in queries[:warmup]:
        encode_one(q)
    samples = []
    for q in queries:
        start = time.perf_counter()
        encode_one(q)
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def time_throughput(encode_many: Callable[[list[str]], Any], sentences: list[str], repeats: int = 3,
                    warmup_sentences: int = 64) -> dict[str, float]:
    """Sentences per second over the whole list; median of ``repeats`` full passes."""
    encode_many(sentences[:warmup_sentences])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode_many(sentences)
        rates.append(len(sentences) / (time.perf_counter() - start))
    return {"sentences_per_s": float(statistics.median(rates)), "runs": [float(r) for r in rates]}


def alternating_rounds(names: list[str], rounds: int, measure: Callable[[str], Any]) -> dict[str, list[Any]]:
    """``measure(name)`` for every name in every round, the order reversed every other round (so no contender
    always runs right after the same other one, or first while the machine warms up); each name's results by round."""
    results: dict[str, list[Any]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            results[name].append(measure(name))
    return results


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@dataclass
class Report:
    title: str
    machine: dict[str, Any] = field(default_factory=machine_info)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def markdown(self, columns: list[tuple[str, str, str]]) -> str:
        """``columns``: (row key, header, format spec)."""
        m = self.machine
        lines = [f"## {self.title}", "",
                 f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, flags {', '.join(m['cpu_flags'])}; "
                 f"Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""]
        lines.append("| " + " | ".join(h for _, h, _ in columns) + " |")
        lines.append("|" + "---|" * len(columns))
        for row in self.rows:
            cells = []
            for key, _, spec in columns:
                value = row.get(key)
                cells.append("-" if value is None else (format(value, spec) if spec else str(value)))
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path, stem: str, columns: list[tuple[str, str, str]]) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        md = self.markdown(columns)
        (folder / f"{stem}.md").write_text(md)
        (folder / f"{stem}.json").write_text(json.dumps(
            {"title": self.title, "machine": self.machine, "rows": self.rows, "notes": self.notes, **self.extra},
            indent=2))
        return folder / f"{stem}.md"
