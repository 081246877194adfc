"""Summaries of measured samples: percentiles, medians, cosines between embedding rows."""

from __future__ import annotations

import statistics

import numpy as np



def percentiles(samples_s: list[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean in milliseconds of durations given in seconds (NaN for no samples), and their count."""
    if not len(samples_s):
        nan = float("nan")
        return {"p50_ms": nan, "p95_ms": nan, "p99_ms": nan, "max_ms": nan, "mean_ms": nan, "n": 0}
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()), "mean_ms": float(ms.mean()),
            "n": int(len(ms))}


def median(values) -> float:
    return float(statistics.median(values))


