"""Bad requests and limits (RELIABILITY 25-31): status codes, error JSON shapes, and what the limits let through.

A real tiny export is served by uvicorn on 127.0.0.1 in a thread of the test process, so each test can pick its
own limits; test_serve_http.py covers the same app in a separate `peft-export serve` process.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from serve_support import TINY_MAX_SEQ_LENGTH, AdapterModel, serving, wait_until  # noqa: E402

from peft_export import EmbeddingModel  # noqa: E402


@pytest.fixture(scope="module")
def reference(tiny):
    return EmbeddingModel(tiny["export"])


@pytest.fixture(scope="module")
def server(tiny):
    with serving(EmbeddingModel(tiny["export"]), max_inputs_per_request=4, max_request_bytes=200_000,
                 max_input_chars=5_000) as srv:
        srv.client = httpx.Client(base_url=srv.url, timeout=30)
        yield srv
        srv.client.close()


def openai_error(response, status: int, code: str, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param, error
    assert error["type"] == ("invalid_request_error" if status < 500 and status != 429 else error["type"])
    assert "Traceback" not in response.text
    return error["message"]


def tei_error(response, status: int, error_type: str = "Validation") -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    return body["error"]


# ----- 25: body not JSON, missing fields -----
def test_body_not_json_is_400(server):
    response = server.client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
    assert "not valid JSON" in openai_error(response, 400, "invalid_json")
    assert "JSON object" in openai_error(server.client.post("/v1/embeddings", json=["a"]), 400, "invalid_json")
    assert "not valid JSON" in tei_error(server.client.post("/embed", content=b"\xff\xfe"), 400)


def test_missing_fields_are_422_naming_them(server, tiny):
    name = tiny["export"].name
    message = openai_error(server.client.post("/v1/embeddings", json={"model": name}), 422, "missing_field", "input")
    assert "'input' is required" in message
    message = openai_error(server.client.post("/v1/embeddings", json={"input": "a"}), 422, "missing_field", "model")
    assert name in message  # says which names exist
    assert "'inputs' is required" in tei_error(server.client.post("/embed", json={"input": "a"}), 422)
    assert "source_sentence" in tei_error(server.client.post("/similarity", json={"inputs": {"sentences": ["a"]}}), 422)


def test_body_over_the_size_limit_is_413(server, tiny):
    big = {"model": tiny["export"].name, "input": ["word " * 900] * 50}  # ~225 kB > 200 kB
    message = openai_error(server.client.post("/v1/embeddings", json=big), 413, "payload_too_large")
    assert "200000 bytes" in message

    def chunked():  # no Content-Length: the limit is enforced while streaming
        for _ in range(30):
            yield b" " * 10_000

    openai_error(server.client.post("/v1/embeddings", content=chunked()), 413, "payload_too_large")
    assert server.client.get("/health").status_code == 200


# ----- 26: empty and non-string inputs -----
@pytest.mark.parametrize("inputs, code, param", [
    ([], "empty_input", "input"),
    (["fine", ""], "empty_input", "input[1]"),
    ("", "empty_input", "input"),
    (["fine", 3], "invalid_type", "input[1]"),
    ([None], "invalid_type", "input[0]"),
    ({"text": "a"}, "invalid_type", "input"),
    ([[101, 2023]], "invalid_type", "input[0]"),
])
def test_bad_inputs_are_422_naming_the_index(server, tiny, inputs, code, param):
    response = server.client.post("/v1/embeddings", json={"model": tiny["export"].name, "input": inputs})
    message = openai_error(response, 422, code, param)
    assert param in message
    if inputs == [[101, 2023]]:
        assert "token arrays are not supported" in message


@pytest.mark.parametrize("route, body, found", [
    ("/v1/embeddings", {"input": [None]}, "input[0] must be a string, found null"),
    ("/v1/embeddings", {"input": {"text": "a"}}, "found object"),
    ("/v1/embeddings", {"input": ["a", 2.5]}, "input[1] must be a string, found number"),
    ("/v1/embeddings", {"input": [True]}, "found boolean"),
    ("/v1/embeddings", {"input": "a", "prompt_name": ["q"]}, "'prompt_name' must be a string, found array"),
    ("/v1/embeddings", {"input": "a", "model": 7}, "'model' must be a string, found number"),
    ("/embed", {"inputs": [{"a": 1}]}, "inputs[0] must be a string, found object"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": "b"}}, "must be a list of strings, found string"),
])
def test_type_errors_name_json_types_not_python_ones(server, tiny, route, body, found):
    if route == "/v1/embeddings":
        body = {"model": tiny["export"].name, **body}
    response = server.client.post(route, json=body)
    assert response.status_code == 422 and found in response.text, response.text
    assert not re.search(r"found (NoneType|dict|float|bool|list|str|int)\b", response.text), response.text
    response = server.client.post("/v1/embeddings", json=[1, 2])
    assert "must be a JSON object, found array" in openai_error(response, 400, "invalid_json")


def test_tei_bad_inputs_name_the_index(server):
    assert "inputs[2]" in tei_error(server.client.post("/embed", json={"inputs": ["a", "b", 7]}), 422)
    assert "inputs[0] is an empty string" in tei_error(server.client.post("/embed", json={"inputs": [""]}), 422)


# ----- 27: inputs per request -----
def test_exactly_the_input_limit_passes_and_one_more_is_422(server, tiny, reference):
    name = tiny["export"].name
    texts = [f"sentence number {i}" for i in range(5)]
    ok = server.client.post("/v1/embeddings", json={"model": name, "input": texts[:4]})
    assert ok.status_code == 200
    got = np.array([d["embedding"] for d in ok.json()["data"]])
    np.testing.assert_allclose(got, reference.encode(texts[:4]), atol=1e-6)
    message = openai_error(server.client.post("/v1/embeddings", json={"model": name, "input": texts}), 422,
                           "too_many_inputs", "input")
    assert "5 inputs" in message and "limit is 4" in message
    assert "limit is 4" in tei_error(server.client.post("/embed", json={"inputs": texts}), 422)


# ----- 28: too many tokens -----
def test_too_many_tokens_is_422_unless_truncation_is_asked(server, tiny, reference):
    name = tiny["export"].name
    long_text = " ".join(f"word{i % 7}" for i in range(200))
    message = openai_error(server.client.post("/v1/embeddings", json={"model": name, "input": ["short", long_text]}),
                           422, "too_many_tokens", "input[1]")
    assert f"at most {TINY_MAX_SEQ_LENGTH}" in message and "truncate" in message

    response = server.client.post("/v1/embeddings", json={"model": name, "input": long_text, "truncate": True})
    assert response.status_code == 200, response.text
    got = np.array(response.json()["data"][0]["embedding"])
    np.testing.assert_allclose(got, reference.encode(long_text), atol=1e-6)
    # ... which is the embedding of the text cut to the model's tokens
    encoding = reference.tokenizer.encode(long_text)
    last_kept = encoding.offsets[TINY_MAX_SEQ_LENGTH - 2][1]
    np.testing.assert_allclose(got, reference.encode(long_text[:last_kept]), atol=1e-6)
    assert response.json()["usage"]["prompt_tokens"] == TINY_MAX_SEQ_LENGTH

    assert "inputs[0]" in tei_error(server.client.post("/embed", json={"inputs": [long_text]}), 422)
    tei = server.client.post("/embed", json={"inputs": [long_text], "truncate": True})
    np.testing.assert_allclose(np.array(tei.json()[0]), reference.encode(long_text), atol=1e-6)


def test_auto_truncate_setting_truncates_when_the_request_does_not_say(tiny, reference):
    long_text = "many words " * 100
    with serving(EmbeddingModel(tiny["export"]), auto_truncate=True) as srv:
        response = httpx.post(srv.url + "/embed", json={"inputs": long_text}, timeout=30)
        np.testing.assert_allclose(np.array(response.json()[0]), reference.encode(long_text), atol=1e-6)
        refused = httpx.post(srv.url + "/embed", json={"inputs": long_text, "truncate": False}, timeout=30)
        assert refused.status_code == 422


# ----- 29: a 10 MB string -----
def test_a_10_mb_string_is_rejected_quickly_by_the_character_cap(tiny):
    huge = "a" * 10_000_000
    with serving(EmbeddingModel(tiny["export"])) as srv:  # default limits: 16 MiB body, 100k characters
        started = time.perf_counter()
        response = httpx.post(srv.url + "/v1/embeddings", json={"model": tiny["export"].name, "input": ["ok", huge]},
                              timeout=30)
        elapsed = time.perf_counter() - started
    message = openai_error(response, 422, "input_too_long", "input[1]")
    assert "10000000 characters" in message and "100000" in message
    assert elapsed < 3.0, elapsed  # tokenizing 10 MB would take far longer


# ----- 30: dimensions and encoding_format -----
@pytest.mark.parametrize("dimensions", [0, -1, 33, 2.5, "8", True])
def test_bad_dimensions_are_422(server, tiny, dimensions):
    response = server.client.post("/v1/embeddings", json={"model": tiny["export"].name, "input": "a",
                                                           "dimensions": dimensions})
    assert "from 1 to 32" in openai_error(response, 422, "invalid_dimensions", "dimensions")
    assert "from 1 to 32" in tei_error(server.client.post("/embed", json={"inputs": "a", "dimensions": dimensions}),
                                       422)


def test_bad_encoding_format_and_flags_are_422(server, tiny):
    name = tiny["export"].name
    response = server.client.post("/v1/embeddings", json={"model": name, "input": "a", "encoding_format": "int8"})
    assert "float, base64" in openai_error(response, 422, "invalid_encoding_format", "encoding_format")
    response = server.client.post("/v1/embeddings", json={"model": name, "input": "a", "truncate": "yes"})
    openai_error(response, 422, "invalid_type", "truncate")
    response = server.client.post("/v1/embeddings", json={"model": name, "input": "a", "prompt_name": "no-such-prompt"})
    assert "not defined" in openai_error(response, 422, "unknown_prompt", "prompt_name")
    assert "Right" in tei_error(server.client.post("/embed", json={"inputs": "a", "truncation_direction": "Left"}),
                                422)


# ----- 31: unknown model names -----
@pytest.mark.parametrize("name", ["nope", "../tiny-lora", "/etc/passwd", "tiny-lora/../tiny-lora", "C:\\x", ""])
def test_unknown_model_is_404_and_never_touches_the_filesystem(tiny, name, monkeypatch):
    import builtins
    import os

    model = AdapterModel(EmbeddingModel(tiny["export"]))
    with serving(model) as srv:
        opened = []
        real_open, real_stat = builtins.open, os.stat
        monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
        monkeypatch.setattr(os, "stat", lambda f, *a, **k: opened.append(str(f)) or real_stat(f, *a, **k))
        calls_before = len(model.calls)
        response = httpx.post(srv.url + "/v1/embeddings", json={"model": name, "input": "a"}, timeout=30)
        tei = httpx.post(srv.url + "/embed", json={"model": name, "inputs": "a"}, timeout=30)
        monkeypatch.undo()
    message = openai_error(response, 404, "model_not_found", "model")
    assert "available: tiny-lora, alpha, beta" in message
    assert tei_error(tei, 404, "NotFound")
    assert len(model.calls) == calls_before  # no fall back to the base: the model never ran
    assert not [f for f in opened if name and name in f]


def test_unknown_routes_and_methods_answer_json(server):
    assert "GET /nope" in openai_error(server.client.get("/nope"), 404, "not_found")
    openai_error(server.client.get("/v1/embeddings"), 405, "method_not_allowed")


def test_a_model_that_fails_gives_500_json_without_traceback(tiny):
    class Broken(AdapterModel):
        def encode(self, sentences, adapter=None, **options):
            raise RuntimeError("secret internal detail")

    with serving(Broken(EmbeddingModel(tiny["export"])), ready=False) as srv:
        wait_until(lambda: srv.app.state.server.status != "warming_up", what="warm-up over")
        health = httpx.get(srv.url + "/health", timeout=10)
        response = httpx.post(srv.url + "/v1/embeddings", json={"model": "tiny-lora", "input": "a"}, timeout=30)
    assert health.status_code == 503 and health.json()["status"].startswith("failed: RuntimeError")
    message = openai_error(response, 500, "internal_error")
    assert "secret" not in response.text and "see its log" in message
