"""`peft-export serve-ray` as a user runs it: a local Ray instance, the proxy on 127.0.0.1, SIGTERM ends it with 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

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


def _start_serve_ray(tmp_path, *extra: str):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve-ray.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "peft_export.cli", "serve-ray", str(switchable_export()),
                                "--port", str(port), *extra], stdout=log, stderr=subprocess.STDOUT, env=env,
                               cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, (tmp_path / "serve-ray.log").read_text()
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout=240, interval=1, what="serve-ray /health 200")
    except BaseException:
        process.kill()
        process.wait()
        log.close()
        raise
    return process, log, url


@pytest.mark.slow
def test_serve_ray_serves_and_stops_on_sigterm(tmp_path):
    export = switchable_export()
    process, log, url = _start_serve_ray(tmp_path, "--replicas", "1", "--merged-adapter-budget", "1",
                                         "--served-model-name", "base")
    try:
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


# ----- issue 22 item 10: a Ray instance peft-export starts listens on loopback; a lost request is a JSON 503 -----
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def _listening(root_pid: int) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket of ``root_pid`` and its descendants."""
    import psutil

    root = psutil.Process(root_pid)
    found = []
    for process in [root, *root.children(recursive=True)]:
        try:
            name = process.name()
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((process.pid, name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue
    return found


def _stop(process, log) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    log.close()
    return code


@pytest.mark.slow
def test_serve_ray_listens_on_loopback_only(tmp_path):
    pytest.importorskip("psutil")
    process, log, url = _start_serve_ray(tmp_path)
    try:
        body = {"model": switchable_export().name, "input": ["a"]}
        assert httpx.post(url + "/v1/embeddings", json=body, timeout=30).status_code == 200
        sockets = _listening(process.pid)
        names = {name for _, name, _, _ in sockets}
        # GCS, raylet, the Serve proxy and replica, the dashboard agent and the driver were on every interface.
        assert {"gcs_server", "raylet"} <= names and any("ServeReplica" in n for n in names), sockets
        assert any(port == int(url.rsplit(":", 1)[1]) for _, _, _, port in sockets), sockets
        assert [s for s in sockets if s[2] not in LOOPBACK] == [], sockets
    finally:
        assert _stop(process, log) == 0, (tmp_path / "serve-ray.log").read_text()


@pytest.mark.slow
def test_the_ray_instance_of_embed_ray_listens_on_loopback_only():
    # `embed --ray` without an address starts its instance through init_ray, as here, then runs Ray Data actors.
    pytest.importorskip("psutil")
    script = textwrap.dedent("""
        import json, os, psutil, ray
        from peft_export.ray.local import init_ray
        init_ray(None)
        ds = ray.data.range(8).map_batches(lambda b: b, batch_size=4)
        assert ds.count() == 8
        me = psutil.Process()
        found = []
        for p in [me, *me.children(recursive=True)]:
            try:
                found += [(p.name(), c.laddr.ip) for c in p.net_connections(kind="tcp") if c.status == "LISTEN"]
            except psutil.Error:
                pass
        print(json.dumps(found))
        ray.shutdown()
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sockets = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"gcs_server", "raylet"} <= {name for name, _ in sockets}, sockets
    assert [s for s in sockets if s[1] not in LOOPBACK] == [], sockets


@pytest.mark.slow
def test_a_killed_replica_gives_json_503_with_retry_after_never_text_500(tmp_path):
    """Bounded load on two replicas; one replica is killed while requests run on it. Every answer is JSON: 200, or
    503 with Retry-After for the requests the dead replica held (Ray's proxy answered those 500 text/plain)."""
    import concurrent.futures
    import threading
    import time

    import psutil

    process, log, url = _start_serve_ray(tmp_path, "--replicas", "2")
    # Requests long enough that the killed replica holds some (short texts: within the tiny model's 48 tokens).
    texts = [f"sentence {i} about adapters, LoRA and exports" for i in range(1024)]
    stop = threading.Event()
    results: list[tuple[int, str, str | None]] = []

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set() and len(results) < 1500:
                response = http.post(url + "/v1/embeddings", json={"model": switchable_export().name, "input": texts})
                results.append((response.status_code, response.headers.get("content-type", ""),
                                response.headers.get("retry-after")))

    try:
        replicas = [p for p in psutil.Process(process.pid).children(recursive=True) if "ServeReplica" in p.name()]
        assert len(replicas) == 2, [p.name() for p in psutil.Process(process.pid).children(recursive=True)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:  # 6 x 1024 inputs: under the server's 8192
            futures = [pool.submit(client) for _ in range(6)]
            wait_until(lambda: len(results) >= 10, timeout=120, interval=0.1, what="10 answers before the kill")
            replicas[0].kill()
            time.sleep(3)
            killed_at = len(results)
            wait_until(lambda: len(results) >= killed_at + 20, timeout=180, interval=0.2, what="answers after the kill")
            stop.set()
            for future in futures:
                future.result()
    finally:
        stop.set()
        _stop(process, log)
    statuses = {}
    for status, content_type, retry_after in results:
        statuses[status] = statuses.get(status, 0) + 1
        assert content_type == "application/json", (status, content_type)
        assert status in (200, 503), (status, content_type)
        if status == 503:
            assert retry_after == "1"
    assert statuses.get(200, 0) >= 30, statuses
    assert statuses.get(503, 0) >= 1, statuses  # the kill caught requests in flight (each client is always busy)
    print(f"statuses over {len(results)} requests with one replica killed: {statuses}")


def _through_middleware(app) -> list[dict]:
    import asyncio

    from peft_export.ray.proxy import AnswerUnansweredRequests

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(AnswerUnansweredRequests(app)({"type": "http", "path": "/v1/embeddings"}, receive, send))
    return sent


@pytest.mark.parametrize("how", ["returns", "raises"])
def test_proxy_middleware_answers_a_request_that_got_no_response_with_json_503(how):
    # What Ray Serve's proxy does when the replica dies mid-request: it sends nothing (returns), or fails.
    async def lost(scope, receive, send):
        if how == "raises":
            raise RuntimeError("ActorDiedError")

    start, body = _through_middleware(lost)
    headers = dict(start["headers"])
    assert start["status"] == 503 and headers[b"content-type"] == b"application/json"
    assert headers[b"retry-after"] == b"1"
    error = json.loads(body["body"])["error"]
    assert error["code"] == "replica_unavailable" and "retry in 1 s" in error["message"]


def test_proxy_middleware_passes_answers_through_and_the_hook_names_it():
    async def answered(scope, receive, send):
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"x"})

    assert [m.get("status") for m in _through_middleware(answered)] == [500, None]  # the app's own answer, as is
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    from peft_export.ray.local import PROXY_CALLBACK
    from peft_export.ray.proxy import proxy_middlewares

    assert PROXY_CALLBACK == "peft_export.ray.proxy:proxy_middlewares"
    assert len(validate_http_proxy_callback_return(proxy_middlewares())) == 1  # what Ray's proxy accepts
