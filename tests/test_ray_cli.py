"""`peft-export serve-ray` as a user runs it: a local Ray instance, the proxy on 127.0.0.1, SIGTERM ends it with 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from serve_support import REPO_ROOT, free_port, wait_until
from switchable_fixtures import switchable_export

from peft_export import EmbeddingModel

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")


def test_serve_ray_refuses_a_missing_folder_in_one_line():
    result = subprocess.run([sys.executable, "-m", "peft_export.cli", "serve-ray", "/nonexistent/export"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "peft-export: error: Export folder not found: /nonexistent/export"


@pytest.mark.slow
def test_serve_ray_serves_and_stops_on_sigterm(tmp_path):
    export = switchable_export()
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(tmp_path / "serve-ray.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "peft_export.cli", "serve-ray", str(export), "--port", str(port),
                                "--replicas", "1", "--merged-adapter-budget", "1", "--served-model-name", "base"],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, (tmp_path / "serve-ray.log").read_text()
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout=240, interval=1, what="serve-ray /health 200")
        texts = ["How do I reset my password?", "LoRA adds B @ A."]
        body = {"model": "mixed", "input": texts}
        response = httpx.post(url + "/v1/embeddings", json=body, headers={"serve_multiplexed_model_id": "mixed"},
                              timeout=30)
        got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        assert np.abs(got - EmbeddingModel(export).encode(texts, adapter="mixed")).max() <= 1e-6
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        log.close()
    assert code == 0, (tmp_path / "serve-ray.log").read_text()
