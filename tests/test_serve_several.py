"""Several exports in one server (issue 25, serving): an embedder and a switchable reranker of one RAG stack, each
with its own batcher, chosen by the request's ``model``; /v1/models lists all, /health is ready only when all are
warm, metrics are labelled by model, and a request naming an export of the other task gets a 400 JSON error."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

import reranker_fixtures  # noqa: E402
from peft_export import ConfigError, CrossEncoderModel  # noqa: E402
from peft_export.serve import ServeSettings, create_app  # noqa: E402

QUERY = "How do I reset my password?"
DOCUMENTS = ["Open the settings page, choose Security and click 'Reset password'.",
             "Paris is the capital and most populous city of France.", "Hi"]


def _wait_ready(client, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def models(bert_case, zoo, reranker):
    return {"embed": bert_case.embedding_model(),
            "rerank": CrossEncoderModel(reranker_fixtures.switchable_reranker(zoo, reranker))}


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(models, ServeSettings())) as client:
        _wait_ready(client)
        yield client


def test_each_export_answers_on_its_routes(models, client):
    embedded = client.post("/v1/embeddings", json={"model": "embed", "input": ["one", "two words"]})
    assert embedded.status_code == 200, embedded.text
    np.testing.assert_allclose([d["embedding"] for d in embedded.json()["data"]],
                               models["embed"].encode(["one", "two words"]), atol=1e-6)
    for name in ("rerank", "qk"):
        ranked = client.post("/v1/rerank", json={"model": name, "query": QUERY, "documents": DOCUMENTS})
        assert ranked.status_code == 200, ranked.text
        want = models["rerank"].rank(QUERY, DOCUMENTS, adapter=False if name == "rerank" else name)
        np.testing.assert_allclose([r["relevance_score"] for r in ranked.json()["results"]],
                                   [w["score"] for w in want], atol=1e-6)
    # TEI routes without `model`: the first export of the route's task
    tei = client.post("/embed", json={"inputs": "one"})
    np.testing.assert_allclose(tei.json(), models["embed"].encode(["one"]), atol=1e-6)
    scores = client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS}).json()
    np.testing.assert_allclose([r["score"] for r in sorted(scores, key=lambda r: r["index"])],
                               models["rerank"].predict([(QUERY, d) for d in DOCUMENTS], adapter=False), atol=1e-6)


@pytest.mark.parametrize(("route", "body", "message"), [
    ("/v1/embeddings", {"model": "rerank", "input": "x"},
     "Model 'rerank' is a reranker model (CrossEncoder); this route serves embedding models (embed). Send reranker "
     "requests to the reranker routes."),
    ("/v1/embeddings", {"model": "qv", "input": "x"}, "Model 'qv' is a reranker model"),
    ("/v1/rerank", {"model": "embed", "query": "q", "documents": ["a"]},
     "Model 'embed' is a embedding model (SentenceTransformer); this route serves reranker models (rerank, qv, qk)"),
])
def test_a_model_of_the_other_task_is_a_400_naming_both(client, route, body, message):
    response = client.post(route, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "wrong_model_task" and error["param"] == "model"
    assert error["message"].startswith(message), error["message"]


def test_tei_routes_refuse_the_other_task_too(client):
    response = client.post("/embed", json={"model": "rerank", "inputs": "x"})
    assert response.status_code == 400
    assert response.json()["error"].startswith("Model 'rerank' is a reranker model")
    unknown = client.post("/rerank", json={"model": "nope", "query": "q", "texts": ["a"]})
    assert unknown.status_code == 404 and "available: rerank, qv, qk" in unknown.json()["error"]


def test_models_health_and_metrics_cover_every_export(client):
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["embed", "rerank", "qv", "qk"]
    assert [m["parent"] for m in client.get("/v1/models").json()["data"]] == [None, None, "rerank", "rerank"]
    assert client.get("/health").json() == {"status": "ready", "models": {"embed": "ready", "rerank": "ready"}}
    client.post("/v1/embeddings", json={"model": "embed", "input": "x"})
    client.post("/v1/rerank", json={"model": "qk", "query": "q", "documents": ["a"]})
    metrics = client.get("/metrics").text
    assert 'peft_export_batch_size_count{model="embed"}' in metrics
    assert 'peft_export_batch_size_count{model="qk"}' in metrics
    assert 'peft_export_requests_total{model="qk",route="/v1/rerank",status="200"}' in metrics
    assert "peft_export_ready 1.0" in metrics


def test_each_export_has_its_own_batcher(client):
    embed, rerank = client.app.state.group.servers
    assert embed.batcher is not rerank.batcher and embed.served.base_name == "embed"
    assert client.app.state.server is embed  # the first export, as app.state.server always was


class SlowWarmUp:
    """A model whose first batch call waits for ``gate``: its export warms up only once the test says so."""

    def __init__(self, model, gate: threading.Event):
        self._model, self._gate = model, gate

    def __getattr__(self, name):
        return getattr(self._model, name)

    def encode(self, *args, **kwargs):
        self._gate.wait(timeout=30)
        return self._model.encode(*args, **kwargs)


def test_health_is_ready_only_when_every_export_is_warm(models):
    gate = threading.Event()
    app = create_app({"embed": SlowWarmUp(models["embed"], gate), "rerank": models["rerank"]}, ServeSettings())
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").json()["models"]["rerank"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        waiting = client.get("/health")
        assert waiting.status_code == 503
        assert waiting.json() == {"status": "warming_up", "models": {"embed": "warming_up", "rerank": "ready"}}
        assert "peft_export_ready 0.0" in client.get("/metrics").text
        gate.set()
        _wait_ready(client)
        assert client.get("/health").json()["status"] == "ready"


def test_names_must_be_unique_across_exports(models):
    with pytest.raises(ConfigError, match=r"The name 'qv' is served by two exports \(rerank and qv\)"):
        create_app({"rerank": models["rerank"], "qv": models["embed"]}, ServeSettings())
    with pytest.raises(ConfigError, match=r"served_model_name names the one export of a single-export server"):
        create_app(models, ServeSettings(served_model_name="x"))
    with pytest.raises(ConfigError, match=r"--default-adapter 'zz' is not an adapter of any served export; they "
                                          r"have 'qv', 'qk'"):
        create_app(models, ServeSettings(default_adapter="zz"))


def test_default_adapter_applies_to_the_export_that_has_it(models):
    with TestClient(create_app(models, ServeSettings(default_adapter="qk"))) as client:
        _wait_ready(client)
        scores = client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS}).json()
        np.testing.assert_allclose([r["score"] for r in sorted(scores, key=lambda r: r["index"])],
                                   models["rerank"].predict([(QUERY, d) for d in DOCUMENTS], adapter="qk"), atol=1e-6)
        assert client.post("/embed", json={"inputs": "x"}).status_code == 200  # the embedder has no default adapter


class WrongShape:
    """A reranker whose batch call returns one value per batch instead of one per pair."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def predict(self, pairs, **options):
        if any("break" in passage for _, passage in pairs):
            return np.zeros(len(pairs) + 1, np.float32)
        return self._model.predict(pairs, **options)


def test_a_batch_with_results_of_the_wrong_shape_is_a_500_and_the_server_goes_on(models):
    with TestClient(create_app({"embed": models["embed"], "rerank": WrongShape(models["rerank"])},
                               ServeSettings())) as client:
        _wait_ready(client)
        broken = client.post("/v1/rerank", json={"model": "rerank", "query": "q", "documents": ["break", "a"]})
        assert broken.status_code == 500
        assert broken.json()["error"] == {"message": "The server failed to process the request; see its log",
                                          "type": "server_error", "param": None, "code": "internal_error"}
        fine = client.post("/v1/rerank", json={"model": "rerank", "query": "q", "documents": ["a", "b"]})
        assert fine.status_code == 200 and len(fine.json()["results"]) == 2


@pytest.mark.slow
def test_peft_export_serve_process_with_an_embedder_and_a_switchable_reranker(models, tmp_path):
    """`python -m peft_export.cli serve embed=EXPORT rerank=EXPORT` on loopback answers both tasks as the
    in-process classes do (two reranker adapters), and SIGTERM ends it with status 0."""
    import httpx

    from peft_export.bench.server import served

    exports = [f"embed={models['embed'].path}", f"rerank={models['rerank'].path}"]
    with served(exports, [], tmp_path / "serve.log", timeout=120) as server:
        assert server.url.startswith("http://127.0.0.1:")
        listed = httpx.get(server.url + "/v1/models", timeout=10).json()
        assert [m["id"] for m in listed["data"]] == ["embed", "rerank", "qv", "qk"]
        embedded = httpx.post(server.url + "/v1/embeddings", json={"model": "embed", "input": ["one", "two"]},
                              timeout=30)
        assert embedded.status_code == 200, embedded.text
        np.testing.assert_allclose([d["embedding"] for d in embedded.json()["data"]],
                                   models["embed"].encode(["one", "two"]), atol=1e-6)
        for adapter in ("qv", "qk"):
            ranked = httpx.post(server.url + "/v1/rerank", json={"model": adapter, "query": QUERY,
                                                                 "documents": DOCUMENTS}, timeout=30)
            assert ranked.status_code == 200, ranked.text
            want = models["rerank"].rank(QUERY, DOCUMENTS, adapter=adapter)
            assert [r["index"] for r in ranked.json()["results"]] == [w["corpus_id"] for w in want]
            np.testing.assert_allclose([r["relevance_score"] for r in ranked.json()["results"]],
                                       [w["score"] for w in want], atol=1e-6)
        wrong = httpx.post(server.url + "/v1/rerank", json={"model": "embed", "query": "q", "documents": ["a"]},
                           timeout=30)
        assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_model_task"
    assert server.exit_status == 0, (tmp_path / "serve.log").read_text()
    assert "serving embed, rerank, qv, qk on http://127.0.0.1:" in (tmp_path / "serve.log").read_text()


def test_cli_serve_refuses_two_exports_under_one_name(models, capsys):
    from peft_export.cli import main

    path = str(models["embed"].path)
    assert main(["serve", f"a={path}", f"a={models['rerank'].path}"]) == 2
    assert capsys.readouterr().err.strip().startswith("peft-export: error: Two exports are served as 'a'")
    assert main(["serve", path, str(models["rerank"].path), "--served-model-name", "x"]) == 2
    assert "--served-model-name names the one export served; with several, name each one as NAME=PATH" in \
        capsys.readouterr().err
