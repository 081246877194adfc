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
