"""The HTTP load generator of the serving benchmarks: concurrent OpenAI-style embedding requests, or /v1/rerank
requests, to a server on 127.0.0.1, each response checked against in-process ``encode`` / ``predict`` before any
speed is reported."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Callable

import numpy as np

from ..runtime.similarity import cosine_rows
from .stats import percentiles

# Lossy exports (int8, fp16) give slightly different results for the same text in another batch: dynamic int8
# picks activation scales per batch (ONNX Runtime int8 on MiniLM: cosine 0.995 between a text alone and padded),
# OpenVINO picks kernels by shape (static int8: up to 2.6e-3 apart), and the server composes its own batches.
# Their responses are held to a cosine to the in-process result instead, which still catches a wrong text or a
# wrong order (cosines far below 0.9) but not noise of int8 size.
LOSSY_MIN_COSINE = 0.99


def is_lossy(model) -> bool:
    export = model.manifest.get("export", {})
    return export.get("dtype", "float32") != "float32" or export.get("weight_format", "fp32") != "fp32"


def client(url: str, concurrency: int):
    """An async HTTP client for ``url`` with a connection per concurrent request."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=url, timeout=120, limits=limits)


async def load_level(http, sentences: list[str], references: dict[str, np.ndarray], size: int,
                     pick: Callable[[int], str], concurrency: int, max_requests: int, max_seconds: float,
                     headers_for: Callable[[str], dict] | None = None, log: Callable[[str], None] = print) -> dict:
    """``concurrency`` workers send requests of ``size`` sentences to ``/v1/embeddings`` on the client ``http`` until
    ``max_requests`` are sent or ``max_seconds`` have passed; request n goes to model ``pick(n)`` and its answer is
    compared with ``references[pick(n)]`` (max abs diff, min cosine). Requests/s, embeddings/s, latency percentiles."""
    latencies: list[float] = []
    errors = 0
    max_diff, min_cosine = 0.0, 1.0
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal errors, max_diff, min_cosine
        for n in counter:
            if time.perf_counter() > deadline:
                return
            start_index = (n * size * 7) % len(sentences)
            indices = [(start_index + k) % len(sentences) for k in range(size)]
            name = pick(n)
            # truncate: in-process encode truncates long passages to max_seq_length too
            body = {"model": name, "input": [sentences[i] for i in indices], "encoding_format": "base64",
                    "truncate": True}
            started = time.perf_counter()
            response = await http.post("/v1/embeddings", json=body,
                                       headers=headers_for(name) if headers_for else None)
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                errors += 1
                if errors == 1:
                    log(f"  first error: {response.status_code} {response.text[:300]}")
                continue
            got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                            for d in response.json()["data"]])
            want = references[name][indices]
            max_diff = max(max_diff, float(np.abs(got - want).max()))
            cosine = cosine_rows(got, want)
            min_cosine = min(min_cosine, float(cosine.min()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    done = len(latencies)
    stats = percentiles(latencies)
    return {"concurrency": concurrency, "requests": done, "seconds": elapsed, "requests_per_s": done / elapsed,
            "embeddings_per_s": (done - errors) * size / elapsed, "errors": errors, "max_abs_diff": max_diff,
            "min_cosine": min_cosine, **{k: stats[k] for k in ("p50_ms", "p95_ms", "p99_ms")}}


async def rerank_level(http, requests: list[tuple[str, list[str]]], references: dict[tuple[str, int], np.ndarray],
                       pick: Callable[[int], str], concurrency: int, max_requests: int, max_seconds: float,
                       log: Callable[[str], None] = print) -> dict:
    """``concurrency`` workers send ``/v1/rerank`` requests until ``max_requests`` are sent or ``max_seconds`` have
    passed; request n scores ``requests[n % len(requests)]`` (one query, its documents) with model ``pick(n)``, and
    its scores, put back in document order, are compared with ``references[(model, n % len(requests))]``.
    Requests/s, pairs/s, latency percentiles and the largest score difference."""
    latencies: list[float] = []
    errors = pairs = 0
    max_diff = 0.0
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal errors, pairs, max_diff
        for n in counter:
            if time.perf_counter() > deadline:
                return
            index, name = n % len(requests), pick(n)
            query, documents = requests[index]
            body = {"model": name, "query": query, "documents": documents, "truncate": True}
            started = time.perf_counter()
            response = await http.post("/v1/rerank", json=body)
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                errors += 1
                if errors == 1:
                    log(f"  first error: {response.status_code} {response.text[:300]}")
                continue
            got = np.empty(len(documents), dtype=np.float32)
            for result in response.json()["results"]:
                got[result["index"]] = result["relevance_score"]
            max_diff = max(max_diff, float(np.abs(got - references[(name, index)]).max()))
            pairs += len(documents)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    done = len(latencies)
    stats = percentiles(latencies)
    return {"concurrency": concurrency, "requests": done, "seconds": elapsed, "requests_per_s": done / elapsed,
            "pairs_per_s": pairs / elapsed, "errors": errors, "max_abs_diff": max_diff,
            **{k: stats[k] for k in ("p50_ms", "p95_ms", "p99_ms")}}
