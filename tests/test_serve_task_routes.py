"""The serving side of the task seam (issue 24): create_app serves the routes the model's task names (Task.routes)
next to the task-independent ones (/health, /live, /v1/models, /metrics), on the same batcher, limits and errors."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from serve_support import AdapterModel  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from peft_export import ConfigError  # noqa: E402
from peft_export.serve import ServeSettings, create_app  # noqa: E402
from peft_export.serve.app import served_task  # noqa: E402
from peft_export.serve.protocol import ApiError, parse_texts, read_json_body  # noqa: E402
from peft_export.tasks import EMBEDDING, TASKS  # noqa: E402

ECHO = "test-echo-norms"


def echo_routes(server):
    """A second task's routes: POST /norms answers each input's embedding norm, through the server's plumbing."""
    from starlette.routing import Route

    from peft_export.serve.app import json_response

    async def norms(request, info):
        body = await read_json_body(request, server.settings.max_request_bytes)
        adapter = server.tei_adapter(body, info)
        texts, single = parse_texts(body.get("inputs"), "inputs", server.settings.max_inputs_per_request,
                                    server.settings.max_input_chars)
        if "fail" in texts:
            raise ApiError(422, "test_refusal", "inputs holds 'fail'", param="inputs")
        texts, tokens = await server.token_counts(texts, "", False, "inputs", single)
        vectors = await server.submit(request, (adapter, None), texts, tokens)
        return json_response({"norms": np.linalg.norm(vectors, axis=1).tolist(), "tokens": tokens})

    return [Route("/norms", server.endpoint("/norms", "tei", norms), methods=["POST"])]


class EchoModel(AdapterModel):
    task = ECHO


@pytest.fixture
def echo_task(monkeypatch):
    task = dataclasses.replace(EMBEDDING, name=ECHO, routes=f"{__name__}:echo_routes")
    monkeypatch.setitem(TASKS, ECHO, task)
    return task


def test_the_app_serves_the_routes_of_the_models_task(bert_case, echo_task):
    inner = bert_case.embedding_model()
    model = EchoModel(inner)
    with TestClient(create_app(model, ServeSettings())) as client:
        # /health says 503 while the warm-up runs in the background: wait for it, as a load balancer would.
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health").json()
            time.sleep(0.05)
        response = client.post("/norms", json={"inputs": ["one", "a longer input"]})
        assert response.status_code == 200, response.text
        expected = np.linalg.norm(inner.encode(["one", "a longer input"]), axis=1)
        np.testing.assert_allclose(response.json()["norms"], expected, rtol=1e-6)
        # The task-independent parts come with it: errors in the route family's shape, metrics, models, health.
        refused = client.post("/norms", json={"inputs": ["fail"]})
        assert refused.status_code == 422 and refused.json()["error"] == "inputs holds 'fail'"
        assert client.post("/norms", json={"inputs": ["x"], "model": "nope"}).status_code == 404
        assert client.get("/health").json() == {"status": "ready"}
        assert client.get("/v1/models").json()["data"][0]["id"] == model.path.name
        assert 'route="/norms"' in client.get("/metrics").text
        # The embedding task's routes are not this task's.
        missing = client.post("/v1/embeddings", json={"input": "x", "model": model.path.name})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_an_embedding_model_gets_the_embedding_routes(bert_case):
    model = bert_case.embedding_model()
    assert served_task(model) is EMBEDDING
    app = create_app(model, ServeSettings())
    paths = [route.path for route in app.routes]
    assert paths == ["/v1/embeddings", "/embeddings", "/embed", "/similarity", "/v1/models", "/health", "/live",
                     "/metrics"]


def test_objects_without_a_task_are_served_as_embedders(bert_case):
    assert served_task(AdapterModel(bert_case.embedding_model())) is EMBEDDING


def test_a_model_of_an_unknown_task_is_refused(bert_case):
    with pytest.raises(ConfigError, match=f"Unknown task {ECHO!r}; this version of peft_export knows embedding"):
        create_app(EchoModel(bert_case.embedding_model()), ServeSettings())
