"""A reranker export on Ray Serve (local Ray, 2 CPUs, HTTP proxy on 127.0.0.1): ``serve_app`` opens the export with
the class of its task, so the replica serves ``/rerank``, ``/v1/rerank`` and ``/predict`` (it opened every export
as an embedder, and a reranker's was refused). Each adapter of a switchable reranker answers as in-process ``rank``
(1e-6), and the multiplexing header merges the adapter on the replica that serves it."""

from __future__ import annotations

import numpy as np
import pytest
from serve_support import on_local_ray_serve, wait_until

from peft_export import CrossEncoderModel

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow

HEADER = "serve_multiplexed_model_id"
APP = "peft-export-rerank-test"
QUERY = "How do I reset my password?"
DOCUMENTS = ["Open the settings page, choose Security and click 'Reset password'.",
             "Paris is the capital and most populous city of France.", "A password manager keeps them safe."]


@pytest.fixture(scope="module")
def export(zoo, reranker):
    import reranker_fixtures

    return reranker_fixtures.switchable_reranker(zoo, reranker)


@pytest.fixture(scope="module")
def served(export):
    from peft_export.serve import ServeSettings

    with on_local_ray_serve(export, APP, replicas=1, merged_adapter_budget=1,
                            settings=ServeSettings(served_model_name="rr")) as url:
        yield url


@pytest.mark.parametrize("name", ["rr", "qv", "qk"])
def test_each_adapter_ranks_as_in_process(served, export, name):
    model = CrossEncoderModel(export)
    adapter = False if name == "rr" else name
    want = model.predict([(QUERY, d) for d in DOCUMENTS], adapter=adapter)
    for _ in range(3):  # cold (LoRA branches) and, once merged in the background, hot: the same answer
        response = httpx.post(served + "/v1/rerank", json={"model": name, "query": QUERY, "documents": DOCUMENTS},
                              headers={HEADER: name}, timeout=30)
        assert response.status_code == 200, response.text
        results = sorted(response.json()["results"], key=lambda r: r["index"])
        np.testing.assert_allclose([r["relevance_score"] for r in results], want, atol=1e-6)
    tei = httpx.post(served + "/predict", json={"model": name, "inputs": [QUERY, DOCUMENTS[0]], "raw_scores": True},
                     timeout=30)
    assert tei.status_code == 200, tei.text
    logit = model.predict([(QUERY, DOCUMENTS[0])], adapter=adapter, activation_fn="identity")[0]
    assert abs(tei.json()[0]["score"] - float(logit)) <= 1e-6


def test_the_header_merges_the_adapter_on_its_replica(served):
    def merged(name: str) -> bool:
        metrics = httpx.get(served + "/metrics", headers={HEADER: name}, timeout=10).text
        return f'peft_export_adapter_merged{{model="{name}"}} 1.0' in metrics

    httpx.post(served + "/v1/rerank", json={"model": "qk", "query": QUERY, "documents": DOCUMENTS},
               headers={HEADER: "qk"}, timeout=30)
    wait_until(lambda: merged("qk"), timeout=60, interval=0.5, what="qk merged")


def test_an_embedding_route_names_the_task(served):
    response = httpx.post(served + "/v1/embeddings", json={"model": "rr", "input": ["x"]}, timeout=30)
    assert response.status_code in (400, 404), response.text


@pytest.mark.parametrize("header", ["nope", "../../etc/passwd", "QV"])
def test_a_header_naming_no_adapter_is_a_404_not_the_base(served, header):
    """The multiplexing header used to be ignored when it named no adapter: the base answered a client that asked
    for an adapter by the header alone (the TEI route without ``model``)."""
    for path, body in (("/rerank", {"query": QUERY, "texts": DOCUMENTS}),
                       ("/v1/rerank", {"model": "rr", "query": QUERY, "documents": DOCUMENTS})):
        response = httpx.post(served + path, json=body, headers={HEADER: header}, timeout=30)
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == HEADER
        assert repr(header) in error["message"] and "available: rr, qk, qv" in error["message"]
    base = httpx.post(served + "/v1/rerank", json={"model": "rr", "query": QUERY, "documents": DOCUMENTS},
                      headers={HEADER: "rr"}, timeout=30)  # the base's own name is served
    assert base.status_code == 200, base.text


def test_hostile_bodies_get_json_errors_through_the_proxy(served):
    def post(path: str, **request):
        response = httpx.post(served + path, timeout=60, **request)
        assert response.headers["content-type"] == "application/json", response.text[:200]
        return response

    assert post("/v1/rerank", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert post("/v1/rerank", content=b"[1, 2]", headers={"content-type": "application/json"}).status_code in (400, 422)
    response = post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": ["a", None]})
    assert response.status_code == 422 and "documents[1]" in response.text
    response = post("/v1/rerank", json={"model": "rr", "query": 5, "documents": DOCUMENTS})
    assert response.status_code == 422 and "query" in response.text
    response = post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": ["a"] * 2049})
    assert response.status_code == 422 and "2048" in response.text
    assert post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": ["a"] * 2048}).status_code == 200
    response = post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": ["word " * 2_000_000]})
    assert response.status_code == 422 and "100000" in response.text.replace(",", "")
    assert post("/v1/rerank", content=b"x" * (17 * 1024 * 1024),
                headers={"content-type": "application/json"}).status_code == 413
