"""Adapters, batching, load and lifecycle over HTTP (RELIABILITY 31-37) with an adapter-capable fake model.

``AdapterModel`` wraps the real tiny export and gives it two adapters ("alpha", "beta") that rotate its output,
plus a gate that holds the model thread: with it, queueing, overload and disconnects are deterministic.
"""

from __future__ import annotations

import base64
import concurrent.futures
import random
import socket
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from serve_support import AdapterModel, embeddings_of, serving, wait_ready, wait_until  # noqa: E402

from peft_export import EmbeddingModel  # noqa: E402


@pytest.fixture(scope="module")
def reference(tiny):
    """An independent adapter model: what each request should get, computed in-process one request at a time."""
    return AdapterModel(EmbeddingModel(tiny["export"]))


def test_models_lists_the_base_and_every_adapter(tiny):
    with serving(AdapterModel(EmbeddingModel(tiny["export"]))) as srv:
        models = httpx.get(srv.url + "/v1/models", timeout=10).json()
    assert models["object"] == "list"
    assert [(m["id"], m["parent"]) for m in models["data"]] == [
        ("tiny-lora", None), ("alpha", "tiny-lora"), ("beta", "tiny-lora")]


def test_each_adapter_equals_in_process_encode_and_they_differ(tiny, reference):
    texts = ["a question about adapters", "a passage"]
    model = AdapterModel(EmbeddingModel(tiny["export"]))
    with serving(model, served_model_name="base") as srv:
        got = {name: embeddings_of(httpx.post(srv.url + "/v1/embeddings", json={"model": name, "input": texts},
                                              timeout=30))
               for name in ("base", "alpha", "beta")}
    np.testing.assert_allclose(got["base"], reference.encode(texts), atol=1e-6)
    for name in ("alpha", "beta"):
        np.testing.assert_allclose(got[name], reference.encode(texts, adapter=name), atol=1e-6)
    assert np.abs(got["alpha"] - got["base"]).max() > 0.05
    assert np.abs(got["alpha"] - got["beta"]).max() > 0.05
    adapters_called = {adapter for _, adapter in model.calls}
    assert adapters_called == {False, "alpha", "beta"}  # the base is called with adapter=False: never the default


def test_tei_routes_use_the_default_adapter_unless_the_body_names_one(tiny, reference):
    with serving(AdapterModel(EmbeddingModel(tiny["export"])), default_adapter="beta") as srv:
        default = httpx.post(srv.url + "/embed", json={"inputs": ["x"]}, timeout=30).json()
        base = httpx.post(srv.url + "/embed", json={"inputs": ["x"], "model": "tiny-lora"}, timeout=30).json()
        scores = httpx.post(srv.url + "/similarity", json={"inputs": {"source_sentence": "x", "sentences": ["x", "y"]},
                                                           "model": "alpha"}, timeout=30).json()
    np.testing.assert_allclose(default, reference.encode(["x"], adapter="beta"), atol=1e-6)
    np.testing.assert_allclose(base, reference.encode(["x"]), atol=1e-6)
    source, sentences = reference.encode(["x"], adapter="alpha"), reference.encode(["x", "y"], adapter="alpha")
    np.testing.assert_allclose(scores, reference.model.similarity(source, sentences)[0], atol=1e-6)


def test_unknown_default_adapter_is_refused_at_start(tiny):
    from peft_export.errors import ConfigError
    from peft_export.serve import ServeSettings, create_app

    with pytest.raises(ConfigError, match="--default-adapter 'gamma' is not served.*'alpha'"):
        create_app(AdapterModel(EmbeddingModel(tiny["export"])), ServeSettings(default_adapter="gamma"))


def test_queued_requests_merge_into_one_model_call_per_adapter(tiny, reference):
    gate = threading.Event()
    model = AdapterModel(EmbeddingModel(tiny["export"]), gate=gate)
    gate.set()  # let the warm-up through
    with serving(model, max_batch_delay_ms=0) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        gate.clear()
        batcher = srv.app.state.server.batcher
        requests = [("alpha", ["a1", "a2"]), ("tiny-lora", ["b1"]), ("beta", ["c1"]), ("alpha", ["a3"]),
                    ("tiny-lora", ["b2", "b3"]), ("beta", ["c2"])]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            blocker = pool.submit(client.post, "/v1/embeddings", json={"model": "tiny-lora", "input": ["hold"]})
            wait_until(lambda: batcher.inflight_inputs == 1 and batcher.queued_inputs() == 0, what="blocker running")
            futures = [pool.submit(client.post, "/v1/embeddings", json={"model": m, "input": t}) for m, t in requests]
            wait_until(lambda: batcher.queued_inputs() == 8, what="8 inputs queued")
            calls_before = len(model.calls)
            gate.set()
            responses = [f.result() for f in futures]
            assert blocker.result().status_code == 200
    merged = model.calls[calls_before:]
    assert sorted((adapter or "", sorted(texts)) for texts, adapter in merged) == [
        ("", ["b1", "b2", "b3"]), ("alpha", ["a1", "a2", "a3"]), ("beta", ["c1", "c2"])]
    for (name, texts), response in zip(requests, responses):
        adapter = None if name == "tiny-lora" else name
        np.testing.assert_allclose(embeddings_of(response), reference.encode(texts, adapter=adapter), atol=1e-6)


def test_mixed_adapters_under_concurrency_each_equal_their_single_request(tiny, reference):
    rng = random.Random(7)
    words = "the quick brown fox jumps over a lazy dog while adapters switch per request".split()
    jobs = []
    for i in range(48):
        texts = [" ".join(rng.choices(words, k=rng.randint(1, 30))) for _ in range(rng.choice([1, 1, 3, 8]))]
        jobs.append({"model": rng.choice(["tiny-lora", "alpha", "beta"]), "input": texts,
                     "encoding_format": rng.choice(["float", "base64"]), "dimensions": rng.choice([None, 8, 32])})
    model = AdapterModel(EmbeddingModel(tiny["export"]), delay_s=0.002)  # slow enough for queues to form
    with serving(model, max_batch_tokens=256) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda job: client.post("/v1/embeddings", json=job), jobs))
    for job, response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        if job["encoding_format"] == "base64":
            got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
        else:
            got = np.array([d["embedding"] for d in data], dtype=np.float32)
        adapter = None if job["model"] == "tiny-lora" else job["model"]
        want = reference.encode(job["input"], adapter=adapter)
        if job["dimensions"]:
            want = want[:, : job["dimensions"]]
            want = want / np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert max(len(texts) for texts, _ in model.calls) > 8  # requests were really merged


def test_queue_full_is_an_immediate_429_and_accepted_requests_still_succeed(tiny, reference):
    gate = threading.Event()
    gate.set()
    model = AdapterModel(EmbeddingModel(tiny["export"]), gate=gate)
    with serving(model, max_concurrent_inputs=4, max_inputs_per_request=4, retry_after_seconds=2) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as client:
        gate.clear()
        batcher = srv.app.state.server.batcher
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            accepted = pool.submit(client.post, "/v1/embeddings", json={"model": "alpha", "input": ["w", "x", "y"]})
            wait_until(lambda: batcher.inflight_inputs == 3, what="3 inputs in flight")
            started = time.perf_counter()
            refused = client.post("/v1/embeddings", json={"model": "alpha", "input": ["one", "two"]})
            elapsed = time.perf_counter() - started
            tei_refused = client.post("/embed", json={"inputs": ["one", "two"]})
            fits = pool.submit(client.post, "/embed", json={"inputs": ["z"]})  # 3 + 1 <= 4: accepted
            wait_until(lambda: batcher.inflight_inputs == 4, what="4 inputs in flight")
            gate.set()
            accepted, fits = accepted.result(), fits.result()
        metrics = client.get("/metrics").text
    assert refused.status_code == 429 and refused.headers["retry-after"] == "2" and elapsed < 1.0
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and error["type"] == "rate_limit_error" and "limit of 4" in error["message"]
    assert tei_refused.status_code == 429 and tei_refused.json()["error_type"] == "Overloaded"
    np.testing.assert_allclose(embeddings_of(accepted), reference.encode(["w", "x", "y"], adapter="alpha"), atol=1e-6)
    np.testing.assert_allclose(fits.json(), reference.encode(["z"]), atol=1e-6)
    assert 'peft_export_request_failures_total{model="alpha",reason="queue_full",route="/v1/embeddings"} 1.0' in metrics


def _send_and_abort(port: int, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)


def test_a_client_that_disconnects_releases_its_slots(tiny):
    gate = threading.Event()
    gate.set()
    model = AdapterModel(EmbeddingModel(tiny["export"]), gate=gate)
    with serving(model) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        gate.clear()
        batcher = srv.app.state.server.batcher
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            blocker = pool.submit(client.post, "/v1/embeddings", json={"model": "beta", "input": ["hold"]})
            wait_until(lambda: batcher.inflight_inputs == 1 and batcher.queued_inputs() == 0, what="blocker running")
            _send_and_abort(srv.port, b'{"model": "alpha", "input": ["gone", "away", "now"]}')
            # the aborted request was accepted and then released while the model is still busy
            wait_until(lambda: srv.app.state.server.metrics.failures.labels(
                "/v1/embeddings", "alpha", "client_disconnected")._value.get() == 1, what="disconnect seen")
            assert batcher.inflight_inputs == 1 and batcher.queued_inputs() == 0
            gate.set()
            assert blocker.result().status_code == 200
    assert all("gone" not in texts for texts, _ in model.calls)  # dropped before reaching the model


@pytest.mark.parametrize("count", [300, pytest.param(3000, marks=pytest.mark.slow)])
def test_many_aborted_requests_leave_the_server_healthy(tiny, reference, count):
    model = AdapterModel(EmbeddingModel(tiny["export"]))
    with serving(model) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        deadline = time.monotonic() + 120
        for i in range(count):  # bounded in count and time, loopback only
            _send_and_abort(srv.port, b'{"model": "alpha", "input": ["abort %d", "me"]}' % i)
            if time.monotonic() > deadline:
                break
        batcher = srv.app.state.server.batcher
        wait_until(lambda: batcher.inflight_inputs == 0, what="all slots released")
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/embeddings", json={"model": "alpha", "input": ["still fine"]})
    np.testing.assert_allclose(embeddings_of(ok), reference.encode(["still fine"], adapter="alpha"), atol=1e-6)


def test_live_answers_at_once_and_health_is_503_until_warmed_up(tiny):
    gate = threading.Event()  # closed: the warm-up blocks in the model
    model = AdapterModel(EmbeddingModel(tiny["export"]), gate=gate)
    with serving(model, ready=False) as srv:
        live = httpx.get(srv.url + "/live", timeout=5)
        health = httpx.get(srv.url + "/health", timeout=5)
        metrics = httpx.get(srv.url + "/metrics", timeout=5).text
        gate.set()
        wait_ready(srv.url)
        ready_metrics = httpx.get(srv.url + "/metrics", timeout=5).text
    assert live.status_code == 200 and live.json() == {"status": "alive"}
    assert health.status_code == 503 and health.json() == {"status": "warming_up"}
    assert "peft_export_ready 0.0" in metrics and "peft_export_ready 1.0" in ready_metrics
    assert {adapter for _, adapter in model.calls} == {False, "alpha", "beta"}  # every adapter warmed


def test_metrics_count_requests_failures_batches_and_tokens_per_adapter(tiny):
    model = AdapterModel(EmbeddingModel(tiny["export"]))
    with serving(model) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        for _ in range(3):
            client.post("/v1/embeddings", json={"model": "alpha", "input": ["one two", "three"]})
        client.post("/embed", json={"inputs": "base text", "model": "tiny-lora"})
        client.post("/v1/embeddings", json={"model": "gamma", "input": "x"})
        client.post("/v1/embeddings", json={"model": "beta", "input": []})
        text = client.get("/metrics").text
        tokens = srv.app.state.server.served.count_tokens(["one two", "three"])
    expected = [
        'peft_export_requests_total{model="alpha",route="/v1/embeddings",status="200"} 3.0',
        'peft_export_requests_total{model="tiny-lora",route="/embed",status="200"} 1.0',
        'peft_export_request_failures_total{model="-",reason="model_not_found",route="/v1/embeddings"} 1.0',
        'peft_export_request_failures_total{model="beta",reason="empty_input",route="/v1/embeddings"} 1.0',
        'peft_export_inputs_total{model="alpha"} 6.0',
        f'peft_export_tokens_total{{model="alpha"}} {3.0 * sum(tokens)}',
        'peft_export_request_duration_seconds_count{model="alpha",route="/v1/embeddings"} 3.0',
        'peft_export_batch_size_count{model="alpha"} 3.0',
        'peft_export_queue_depth{model="beta"} 0.0',
        'peft_export_inputs_in_flight 0.0',
    ]
    for line in expected:
        assert line in text, line
    assert 'model="gamma"' not in text  # raw request text never becomes a label
