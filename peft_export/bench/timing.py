"""Timers with warm-up: batch-1 latency over single queries, throughput over whole passes."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from .stats import percentiles


def timed_calls(call: Callable[[], Any], runs: int, warmup: int = 3) -> list[float]:
    """Seconds of each of ``runs`` calls of ``call``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


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
