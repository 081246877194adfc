"""Admission bounds work and scheduling is fair (RELIABILITY 42), over HTTP on 127.0.0.1.

A 99,999-character input with truncate=true is measured on a prefix (never tokenized whole) and embeds exactly like
the whole text; a one-sentence request to another adapter, or to the same one, is not queued behind a tenant's
bulk requests; tokens in flight are bounded like inputs are.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from serve_support import AdapterModel, embeddings_of, serving, wait_until  # noqa: E402

from peft_export import EmbeddingModel  # noqa: E402

REAL = ("Sentence embeddings map text to dense vectors so that similar meanings land close together. "
        "LoRA adds a low-rank update to selected weight matrices; merging it costs nothing at inference. ")


@pytest.fixture(scope="module")
def reference(tiny):
    return AdapterModel(EmbeddingModel(tiny["export"]))


def test_long_truncated_inputs_equal_the_whole_text_and_are_not_tokenized_whole(tiny, reference):
    model = AdapterModel(EmbeddingModel(tiny["export"]))
    texts = [f"{i} " + (REAL * 1000)[:99_997] for i in range(16)] + ["a" * 99_999, "short one"]
    with serving(model) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        response = client.post("/v1/embeddings", json={"model": "alpha", "input": texts, "truncate": True})
        got = embeddings_of(response)
        want_tokens = int(reference.model.tokenize(texts)["attention_mask"].sum())  # whole texts, truncated
        assert response.json()["usage"]["prompt_tokens"] == want_tokens
        refused = client.post("/v1/embeddings", json={"model": "alpha", "input": texts[:1]})
        assert refused.status_code == 422
        assert "input[0] has more than 48 tokens; the model takes at most 48" in refused.json()["error"]["message"]
    np.testing.assert_allclose(got, reference.encode(texts, adapter="alpha"), atol=1e-6)
    # what reached the model: prefixes of the long real-text inputs, not 100,000 characters each
    sent = [text for texts_, adapter in model.calls if adapter == "alpha" for text in texts_]
    assert max(len(t) for t in sent if t[0].isdigit()) < 5_000


def test_a_short_request_is_not_queued_behind_another_tenants_bulk_load(tiny, reference):
    gate = threading.Event()
    gate.set()
    model = AdapterModel(EmbeddingModel(tiny["export"]), gate=gate)
    with serving(model, max_batch_delay_ms=0, max_batch_tokens=64) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        batcher = srv.app.state.server.batcher
        gate.clear()
        blocker = pool.submit(client.post, "/v1/embeddings", json={"model": "alpha", "input": ["hold"]})
        wait_until(lambda: batcher.inflight_inputs == 1 and batcher.queued_inputs() == 0, what="blocker running")
        bulk_texts = [[f"bulk {r} sentence {i} with some words" for i in range(20)] for r in range(3)]
        bulk = [pool.submit(client.post, "/v1/embeddings", json={"model": "alpha", "input": t}) for t in bulk_texts]
        wait_until(lambda: batcher.queued_inputs() == 60, what="bulk queued")
        other = pool.submit(client.post, "/v1/embeddings", json={"model": "beta", "input": "where is my parcel?"})
        wait_until(lambda: batcher.queued_inputs() == 61, what="probe queued")
        same = pool.submit(client.post, "/v1/embeddings", json={"model": "alpha", "input": "and my invoice?"})
        wait_until(lambda: batcher.queued_inputs() == 62, what="second probe queued")
        calls_before = len(model.calls)
        gate.set()
        responses = [f.result() for f in (blocker, *bulk, other, same)]
    calls = model.calls[calls_before:]
    alpha_calls = [texts for texts, adapter in calls if adapter == "alpha"]
    assert len(alpha_calls) >= 5  # the bulk load really spans several model calls
    assert calls[0] == (["where is my parcel?"], "beta"), calls[0]  # next after the running batch
    assert "and my invoice?" in alpha_calls[0]  # a seat in the first alpha batch, not after 60 inputs
    np.testing.assert_allclose(embeddings_of(responses[4]), reference.encode(["where is my parcel?"], adapter="beta"),
                               atol=1e-6)
    for texts, response in zip(bulk_texts, responses[1:4]):
        np.testing.assert_allclose(embeddings_of(response), reference.encode(texts, adapter="alpha"), atol=1e-6)


def test_tokens_in_flight_are_bounded_with_429(tiny):
    gate = threading.Event()
    gate.set()
    model = AdapterModel(EmbeddingModel(tiny["export"]), gate=gate)
    long_text = REAL * 5  # truncated to 48 tokens
    with serving(model, max_batch_delay_ms=0, max_concurrent_tokens=200, auto_truncate=True) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
        batcher = srv.app.state.server.batcher
        gate.clear()
        held = pool.submit(client.post, "/v1/embeddings", json={"model": "alpha", "input": [long_text] * 4})
        wait_until(lambda: batcher.inflight_tokens == 192, what="192 tokens in flight")
        started = time.perf_counter()
        refused = client.post("/v1/embeddings", json={"model": "beta", "input": [long_text]})
        assert time.perf_counter() - started < 2
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "200 tokens in flight (192 now, this request has 48)" in refused.json()["error"]["message"]
        gate.set()
        assert held.result().status_code == 200
        assert client.post("/v1/embeddings", json={"model": "beta", "input": [long_text]}).status_code == 200
