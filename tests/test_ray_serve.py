"""peft_export.ray.serve_app on local Ray Serve (2 CPUs, HTTP proxy on 127.0.0.1): the `peft-export serve` app on two
replicas, each adapter answered like in-process encode (1e-6) through the openai client, requests carrying the
multiplexing header make their adapter merged on the replica that serves them (within the budget), and a replica
killed under load gives errors or retried answers, never a wrong or base-model vector."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import pytest
from serve_support import on_local_ray_serve, wait_until
from switchable_fixtures import TEXTS, switchable_export

from peft_export import ConfigError, EmbeddingModel

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from peft_export.ray import serve_app  # noqa: E402

ATOL = 1e-6
ADAPTERS = ("attn", "ffn", "mixed")
BASE = "base"
APP = "peft-export-test"
HEADER = "serve_multiplexed_model_id"
TEXTS_SERVED = [t for t in TEXTS if t]


@pytest.fixture(scope="module")
def export():
    return switchable_export()


@pytest.fixture(scope="module")
def reference(export):
    model = EmbeddingModel(export)
    return {name: model.encode(TEXTS_SERVED, adapter=False if name == BASE else name) for name in (BASE, *ADAPTERS)}


@pytest.fixture(scope="module")
def served(export):
    """Local Ray (2 CPUs, no dashboard) with Serve's proxy on 127.0.0.1 and the app on 2 replicas, budget 1."""
    from peft_export.serve import ServeSettings

    with on_local_ray_serve(export, APP, replicas=2, merged_adapter_budget=1,
                            settings=ServeSettings(served_model_name=BASE, auto_truncate=True)) as url:
        yield url


def embeddings(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


@pytest.mark.parametrize("name", [BASE, *ADAPTERS])
def test_openai_client_per_adapter_equals_encode(served, reference, name):
    with openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0,
                       default_headers={HEADER: name}) as client:
        for _ in range(3):  # cold (LoRA branches) and, once merged in the background, hot: the same answer
            got = embeddings(client.embeddings.create(model=name, input=TEXTS_SERVED))
            assert np.abs(got - reference[name]).max() <= ATOL


def test_two_replicas_and_the_header_makes_its_adapter_hot(served, reference):
    status = serve.status().applications[APP].deployments["peft-export"]
    assert status.replica_states.get("RUNNING") == 2

    def merged_on_the_replica_of(name: str) -> bool:
        metrics = httpx.get(served + "/metrics", headers={HEADER: name}, timeout=10).text
        return f'peft_export_adapter_merged{{model="{name}"}} 1.0' in metrics

    for name in ("mixed", "attn"):
        for _ in range(3):
            body = {"model": name, "input": TEXTS_SERVED}
            response = httpx.post(served + "/v1/embeddings", json=body, headers={HEADER: name}, timeout=30)
            got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
            assert np.abs(got - reference[name]).max() <= ATOL
        wait_until(lambda n=name: merged_on_the_replica_of(n), timeout=60, interval=0.5, what=f"{name} merged")
    # Without the header the body alone decides: a request for "ffn" is still answered as "ffn".
    response = httpx.post(served + "/v1/embeddings", json={"model": "ffn", "input": TEXTS_SERVED}, timeout=30)
    got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
    assert np.abs(got - reference["ffn"]).max() <= ATOL


def test_unknown_model_is_a_404_even_with_the_header(served):
    response = httpx.post(served + "/v1/embeddings", json={"model": "../etc", "input": ["x"]},
                          headers={HEADER: "../etc"}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_bad_arguments_are_refused(export):
    with pytest.raises(ConfigError, match="replicas must be a positive integer, found 0"):
        serve_app(export, replicas=0)
    with pytest.raises(ConfigError, match="merged_adapter_budget must be a count of adapters >= 0, found -2"):
        serve_app(export, merged_adapter_budget=-2)
    with pytest.raises(ConfigError, match="Export folder not found"):
        serve_app(export / "nope")


@pytest.mark.slow
def test_a_replica_killed_under_load_never_gives_a_wrong_vector(served, reference):
    names = [BASE, *ADAPTERS]
    stop = threading.Event()
    outcomes: list[tuple[str, int, np.ndarray | None]] = []

    def client(worker: int) -> None:
        with httpx.Client(base_url=served, timeout=60) as http:
            for i in range(400):  # bounded
                if stop.is_set():
                    return
                name = names[(worker + i) % len(names)]
                try:
                    response = http.post("/v1/embeddings", json={"model": name, "input": TEXTS_SERVED},
                                         headers={HEADER: name})
                except httpx.HTTPError:
                    outcomes.append((name, -1, None))
                    continue
                got = None
                if response.status_code == 200:
                    got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
                outcomes.append((name, response.status_code, got))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, w) for w in range(8)]
        wait_until(lambda: len(outcomes) >= 40, timeout=120, what="load running")
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::") and APP in a["name"]]
        assert len(replicas) == 2
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        killed_at = len(outcomes)
        time.sleep(8)
        stop.set()
        for future in futures:
            future.result()
    after = outcomes[killed_at:]
    assert sum(status == 200 for _, status, _ in after) >= 10  # the other replica kept serving
    for name, status, got in outcomes:
        assert status == 200 or status >= 500 or status == -1, status  # an error, never a 4xx for a good request
        if got is not None:
            assert np.abs(got - reference[name]).max() <= ATOL, name  # never a wrong or base vector
    wait_until(lambda: serve.status().applications[APP].deployments["peft-export"].replica_states.get("RUNNING")
               == 2, timeout=120, interval=1, what="Serve replaced the killed replica")
