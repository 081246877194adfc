"""`peft-export serve` on a real switchable export: each adapter served under its own name, chosen per request.

The export activates a default adapter ("ffn"), so these tests also pin down that the base name serves the base
model itself, and that TEI's /embed follows the server's --default-adapter rather than the export's.
"""

from __future__ import annotations

import concurrent.futures
import random

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

from serve_support import served_process  # noqa: E402
from switchable_fixtures import TEXTS, switchable_export  # noqa: E402

from peft_export import EmbeddingModel  # noqa: E402

ADAPTERS = ("attn", "ffn", "mixed")
TEXTS_SERVED = [t for t in TEXTS if t]  # OpenAI refuses empty strings; the long one needs truncate=true


@pytest.fixture(scope="module")
def export():
    return switchable_export("serve-default-ffn", default_adapter="ffn")


@pytest.fixture(scope="module")
def reference(export):
    model = EmbeddingModel(export)
    return {name: model.encode(TEXTS_SERVED, adapter=name or False) for name in (None, *ADAPTERS)}


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    with served_process(export, tmp_path_factory.mktemp("serve-switchable") / "server.log",
                        "--served-model-name", "base", "--default-adapter", "mixed") as srv:
        yield srv


def test_reference_adapters_really_differ(reference):
    for name in ADAPTERS:
        assert np.abs(reference[name] - reference[None]).max() > 1e-3, name


def test_models_lists_the_base_and_every_adapter(server):
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]]
    assert ids == ["base", *ADAPTERS]


@pytest.mark.parametrize("name", ["base", *ADAPTERS])
def test_openai_model_field_picks_the_adapter(server, reference, name):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        response = client.embeddings.create(model=name, input=TEXTS_SERVED, extra_body={"truncate": True})
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    np.testing.assert_allclose(got, reference[None if name == "base" else name], atol=1e-6)
    assert response.model == name


def test_tei_embed_uses_the_servers_default_adapter_and_model_overrides_it(server, reference):
    got = httpx.post(server.url + "/embed", json={"inputs": TEXTS_SERVED, "truncate": True}, timeout=30).json()
    np.testing.assert_allclose(np.array(got, np.float32), reference["mixed"], atol=1e-6)
    body = {"inputs": TEXTS_SERVED, "model": "attn", "truncate": True}
    got = httpx.post(server.url + "/embed", json=body, timeout=30).json()
    np.testing.assert_allclose(np.array(got, np.float32), reference["attn"], atol=1e-6)


def test_unknown_adapter_is_404(server):
    response = httpx.post(server.url + "/v1/embeddings", json={"model": "nope", "input": "x"}, timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_concurrent_requests_with_mixed_adapters_each_get_their_own(server, reference):
    rng = random.Random(7)
    jobs = [(rng.choice(["base", *ADAPTERS]), rng.sample(range(len(TEXTS_SERVED)), rng.randint(1, 4)))
            for _ in range(48)]

    def call(job):
        name, index = job
        body = {"model": name, "input": [TEXTS_SERVED[i] for i in index], "truncate": True}
        response = httpx.post(server.url + "/v1/embeddings", json=body, timeout=60)
        response.raise_for_status()
        return np.array([d["embedding"] for d in response.json()["data"]], np.float32)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, jobs))
    for (name, index), got in zip(jobs, results):
        np.testing.assert_allclose(got, reference[None if name == "base" else name][index], atol=1e-6)


def test_merge_adapter_flag_serves_merged_sessions_with_the_same_answers(export, reference, tmp_path):
    with served_process(export, tmp_path / "server.log", "--served-model-name", "base",
                        "--merge-adapter", "all") as srv:
        assert "merged into their own sessions: attn, ffn, mixed" in srv.log()
        for name in ("base", *ADAPTERS):
            body = {"model": name, "input": TEXTS_SERVED, "truncate": True}
            response = httpx.post(srv.url + "/v1/embeddings", json=body, timeout=60)
            assert response.status_code == 200, response.text
            got = np.array([d["embedding"] for d in response.json()["data"]], np.float32)
            np.testing.assert_allclose(got, reference[None if name == "base" else name], atol=1e-5)


def test_merge_adapter_flag_with_an_unknown_name_fails_at_start(export, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "peft_export.cli", "serve", str(export), "--merge-adapter", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Adapter with name 'nope' not found" in done.stderr
