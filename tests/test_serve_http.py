"""`peft-export serve` as a real process on 127.0.0.1, called with the official OpenAI client and plain HTTP.

The served folder is a real (tiny) LoRA export; every response is compared with in-process
``EmbeddingModel.encode`` on the same folder (1e-6).
"""

from __future__ import annotations

import base64
import concurrent.futures
import random
import signal

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

from serve_support import ProcessServer, served_process, wait_until  # noqa: E402

from peft_export import EmbeddingModel  # noqa: E402

TEXTS = ["A LoRA adapter specialises the encoder.", "Short", "émoji 🙂 and RTL שלום", "   spaces   "]


@pytest.fixture(scope="module")
def reference(tiny):
    return EmbeddingModel(tiny["export"])


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    with served_process(tiny["export"], tmp_path_factory.mktemp("serve-log") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_openai_client_float_and_base64_equal_in_process_encode(client, reference, tiny):
    want = reference.encode(TEXTS)
    tokens = reference.tokenize(TEXTS)["attention_mask"].sum()
    # no encoding_format: the client asks for base64 itself and decodes it; "float": JSON numbers;
    # "base64" given explicitly: the client hands back the strings.
    for encoding_format in (None, "float", "base64"):
        options = {"encoding_format": encoding_format} if encoding_format else {}
        response = client.embeddings.create(model=tiny["export"].name, input=TEXTS, **options)
        if encoding_format == "base64":
            got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in response.data])
        else:
            got = np.array([d.embedding for d in response.data], dtype=np.float32)
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert [d.index for d in response.data] == list(range(len(TEXTS)))
        assert response.model == tiny["export"].name
        assert response.usage.prompt_tokens == response.usage.total_tokens == tokens


def test_raw_base64_decodes_to_exactly_the_float_output(server, tiny):
    body = {"model": tiny["export"].name, "input": TEXTS}
    floats = httpx.post(server.url + "/v1/embeddings", json=body).json()["data"]
    encoded = httpx.post(server.url + "/v1/embeddings", json={**body, "encoding_format": "base64"}).json()["data"]
    for f, e in zip(floats, encoded):
        decoded = np.frombuffer(base64.b64decode(e["embedding"]), dtype="<f4")
        assert np.array_equal(decoded, np.array(f["embedding"], dtype=np.float32))


def test_single_string_and_matryoshka_dimensions(client, reference, tiny):
    single = client.embeddings.create(model=tiny["export"].name, input="just one")
    assert len(single.data) == 1
    np.testing.assert_allclose(single.data[0].embedding, reference.encode("just one"), atol=1e-6)
    short = client.embeddings.create(model=tiny["export"].name, input=TEXTS, dimensions=8)
    got = np.array([d.embedding for d in short.data])
    want = reference.encode(TEXTS, truncate_dim=8, normalize_embeddings=True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_openai_client_sees_404_and_422_as_its_own_exceptions(client, tiny):
    with pytest.raises(openai.NotFoundError, match="'other-model' is not served here") as err:
        client.embeddings.create(model="other-model", input="x")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError, match=r"input\[1\] is an empty string"):
        client.embeddings.create(model=tiny["export"].name, input=["x", ""])
    with pytest.raises(openai.UnprocessableEntityError, match="from 1 to 32"):
        client.embeddings.create(model=tiny["export"].name, input="x", dimensions=64)


def test_truncate_through_the_openai_client_extra_body(client, reference, tiny):
    long_text = "tokens " * 300
    with pytest.raises(openai.UnprocessableEntityError, match="tokens; the model takes at most 48"):
        client.embeddings.create(model=tiny["export"].name, input=long_text)
    response = client.embeddings.create(model=tiny["export"].name, input=long_text, extra_body={"truncate": True})
    np.testing.assert_allclose(response.data[0].embedding, reference.encode(long_text), atol=1e-6)


def test_tei_embed_and_similarity_equal_in_process(server, reference):
    embed = httpx.post(server.url + "/embed", json={"inputs": TEXTS}).json()
    np.testing.assert_allclose(np.array(embed), reference.encode(TEXTS, normalize_embeddings=True), atol=1e-6)
    single = httpx.post(server.url + "/embed", json={"inputs": "alone", "dimensions": 4, "normalize": False}).json()
    np.testing.assert_allclose(np.array(single), reference.encode(["alone"], truncate_dim=4), atol=1e-6)
    scores = httpx.post(server.url + "/similarity",
                        json={"inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS[1:]}}).json()
    want = reference.similarity(reference.encode(TEXTS[:1]), reference.encode(TEXTS[1:]))[0]
    np.testing.assert_allclose(scores, want, atol=1e-6)


def test_models_health_live(server, tiny):
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [tiny["export"].name]
    assert httpx.get(server.url + "/health").json() == {"status": "ready"}
    assert httpx.get(server.url + "/live").status_code == 200


def test_concurrent_mixed_requests_each_equal_their_single_request(server, reference, tiny):
    rng = random.Random(3)
    words = "serving embeddings over http with dynamic batching on a small cpu".split()
    jobs = [{"model": tiny["export"].name,
             "input": [" ".join(rng.choices(words, k=rng.randint(1, 20))) for _ in range(rng.choice([1, 2, 16]))],
             "dimensions": rng.choice([None, 16])} for _ in range(40)]
    with httpx.Client(base_url=server.url, timeout=60) as http, concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda job: http.post("/v1/embeddings", json=job), jobs))
    for job, response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        if job["dimensions"]:
            want = reference.encode(job["input"], truncate_dim=job["dimensions"], normalize_embeddings=True)
        else:
            want = reference.encode(job["input"])
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_metrics_endpoint_is_prometheus_text(server, tiny):
    response = httpx.get(server.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    name = tiny["export"].name
    assert f'peft_export_requests_total{{model="{name}",route="/v1/embeddings",status="200"}}' in response.text
    assert "# TYPE peft_export_batch_size histogram" in response.text


def test_sigterm_lets_requests_in_flight_finish_and_exits_0(tiny, reference, tmp_path):
    srv = ProcessServer(tiny["export"], tmp_path / "server.log", "--max-batch-tokens", "512")
    try:
        srv.wait_ready()
        texts = [f"request {i} sentence {j} " * 6 for i in range(6) for j in range(300)]
        jobs = [texts[i * 300:(i + 1) * 300] for i in range(6)]  # 1800 inputs, ~55k tokens, 100+ model calls

        def all_accepted_some_still_running() -> bool:
            # Accepted = in flight + answered; on a loaded machine a request may finish before the last one is
            # accepted, which is fine as long as work is left when SIGTERM arrives.
            in_flight = answered = 0.0
            for line in httpx.get(srv.url + "/metrics", timeout=5).text.splitlines():
                if line.startswith("peft_export_requests_in_flight "):
                    in_flight = float(line.split()[1])
                elif line.startswith("peft_export_requests_total{") and 'route="/v1/embeddings"' in line:
                    answered += float(line.split()[-1])
            return in_flight >= 1 and in_flight + answered == len(jobs)

        with httpx.Client(base_url=srv.url, timeout=120) as http, concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(http.post, "/v1/embeddings", json={"model": tiny["export"].name, "input": job})
                       for job in jobs]
            wait_until(all_accepted_some_still_running, timeout=30, what="every request accepted, work left")
            srv.process.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        code = srv.process.wait(timeout=60)
    finally:
        srv.stop()
    assert code == 0, srv.log()
    for job, response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, reference.encode(job), atol=1e-6)
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/live", timeout=2)


@pytest.mark.parametrize("arguments, message", [
    (["no-such-folder"], "Export folder not found"),
    (["{export}", "--default-adapter", "nope"], "--default-adapter 'nope' is not served"),
    (["{export}", "--max-inputs-per-request", "10", "--max-concurrent-inputs", "5"], "max_concurrent_inputs"),
])
def test_serve_refuses_bad_arguments_with_one_line_and_status_2(tiny, tmp_path, arguments, message):
    import os
    import subprocess
    import sys

    from serve_support import REPO_ROOT

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    argv = [a.format(export=tiny["export"]) for a in arguments]
    result = subprocess.run([sys.executable, "-m", "peft_export.cli", "serve", *argv, "--port", "1"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
