"""Connections under attack (RELIABILITY 40, 41, 43), from outside: raw sockets against `peft-export serve` children.

Slow and half-finished requests are cut off with a JSON 408, open connections are capped below the process's file
limit while new clients keep being served, accept errors are logged at a bounded rate, requests cut off by the
graceful timeout get a JSON 503, and protocol errors (smuggling-shaped framing, huge headers) are JSON too.
Every loop is bounded; every server listens on 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import json
import resource
import signal
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("httptools")

from serve_support import ProcessServer, served_process  # noqa: E402

HEADER_TIMEOUT = 2.0
PARTIAL = b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    return sock


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one response on ``sock`` (Content-Length framed), or (0, {}, b"") on EOF."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, {}, b""
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def json_error(status_headers_body, status: int, code: str) -> str:
    got, headers, body = status_headers_body
    assert got == status, (got, body)
    assert headers["content-type"] == "application/json", headers
    error = json.loads(body)["error"]
    assert error["code"] == code, error
    return error["message"]


def metric(url: str, prefix: str) -> float:
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-conn") / "server.log"
    with served_process(tiny["export"], log, "--header-timeout-s", str(HEADER_TIMEOUT), "--body-timeout-s", "3",
                        "--max-connections", "60") as srv:
        yield srv


# ----- 40: read timeouts, connection cap -----
def test_slow_and_partial_clients_are_cut_off_while_new_clients_are_served(server, tiny):
    partial = [connect(server.port) for _ in range(50)]
    for sock in partial:
        sock.sendall(PARTIAL)
    slow_results: list[tuple[float, tuple]] = []

    def slow_client() -> None:  # one header byte every 0.5 s: never completes within the header timeout
        sock = connect(server.port)
        started = time.monotonic()
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40
        try:
            for byte in request[:20]:  # at most 10 s
                sock.sendall(bytes([byte]))
                time.sleep(0.5)
                sock.settimeout(0.01)
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break
                except (TimeoutError, BlockingIOError):
                    pass
        except OSError:
            pass
        slow_results.append((time.monotonic() - started, read_response(sock)))
        sock.close()

    threads = [threading.Thread(target=slow_client) for _ in range(5)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    # 30 more half-requests go past the cap of 60: the longest-waiting connections make room, nobody gets EMFILE.
    more = [connect(server.port) for _ in range(30)]
    for sock in more:
        sock.sendall(PARTIAL)
    started = time.perf_counter()
    response = httpx.post(server.url + "/v1/embeddings", json={"model": tiny["export"].name, "input": "still served"},
                          timeout=10)
    took = time.perf_counter() - started
    assert response.status_code == 200, response.text
    assert took < 1.5, f"a normal request took {took:.2f} s next to 85 half-open connections"
    for thread in threads:
        thread.join(timeout=20)
    assert len(slow_results) == 5
    for elapsed, result in slow_results:
        message = json_error(result, 408, "read_timeout")
        assert "headers did not arrive within 2 s" in message
        assert HEADER_TIMEOUT - 0.1 <= elapsed < HEADER_TIMEOUT + 3, elapsed
    # Every half-request is gone: evicted to make room (oldest first) or timed out, each with a JSON 408.
    codes = []
    for sock in partial + more:
        status, headers, body = read_response(sock, timeout=HEADER_TIMEOUT + 5)
        codes.append(json.loads(body)["error"]["code"] if status == 408 else status)
        sock.close()
    assert set(codes) <= {"read_timeout", "evicted"} and "evicted" in codes, codes
    assert codes[0] == "evicted"  # the oldest went first
    assert metric(server.url, 'peft_export_connections_closed_total{reason="read_timeout"}') >= 5
    assert metric(server.url, 'peft_export_connections_closed_total{reason="evicted"}') >= 1
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_a_body_that_stops_arriving_gets_408(server, tiny):
    sock = connect(server.port)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 200\r\n\r\n{\"model\": ")
    started = time.monotonic()
    message = json_error(read_response(sock, timeout=10), 408, "read_timeout")
    assert "body did not arrive within 3 s" in message
    assert 2.9 <= time.monotonic() - started < 6
    sock.close()


def test_a_silent_connection_is_closed_without_a_response(server):
    sock = connect(server.port)
    started = time.monotonic()
    assert read_response(sock, timeout=10) == (0, {}, b"")
    assert HEADER_TIMEOUT - 0.1 <= time.monotonic() - started < HEADER_TIMEOUT + 3
    sock.close()


def test_keep_alive_connection_serves_several_requests_then_idles_out(server):
    sock = connect(server.port)
    for _ in range(3):
        sock.sendall(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body) == {"status": "alive"}
    sock.close()


@pytest.mark.slow
def test_a_flood_past_the_open_file_limit_leaves_the_server_reachable(tiny, tmp_path):
    """With `ulimit -n 200` the default cap (2048) is lowered below the limit; 400 half-open connections never
    make accept() fail, /health answers throughout, and the log stays small."""
    def low_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    srv = ProcessServer(tiny["export"], tmp_path / "server.log", "--header-timeout-s", "30",
                        preexec_fn=low_file_limit)
    socks = []
    try:
        srv.wait_ready()
        for i in range(400):
            sock = connect(srv.port)
            sock.sendall(PARTIAL)
            socks.append(sock)
            if i % 100 == 99:
                started = time.perf_counter()
                assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
                assert time.perf_counter() - started < 1.0
        assert metric(srv.url, 'peft_export_connections_closed_total{reason="evicted"}') >= 400 - 200
    finally:
        for sock in socks:
            sock.close()
        code = srv.stop()
    log = srv.log()
    assert code == 0, log
    assert "max_connections lowered from 2048 to 136" in log
    assert "Too many open files" not in log and "Traceback" not in log, log[-3000:]
    assert len(log) < 20_000


def test_accept_errors_are_logged_at_a_bounded_rate(caplog):
    import asyncio

    from peft_export.serve.connections import AcceptErrorLog

    now = [0.0]
    handler = AcceptErrorLog(interval_s=10.0, clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        error = OSError(24, "Too many open files")
        with caplog.at_level("ERROR", logger="peft_export.serve"):
            for i in range(10_000):  # 10,000 failed accepts over 40 s
                now[0] = i * 0.004
                handler(loop, {"message": "socket.accept() out of system resource", "exception": error})
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # t = 0, 10, 20, 30 s
    assert "Too many open files" in lines[0] and "and 2499 more" in lines[1]
    assert all(r.exc_info is None for r in caplog.records)  # no traceback
    assert handler.total == 10_000


# ----- 41: the graceful timeout -----
def test_requests_cut_off_by_the_graceful_timeout_get_json_503(tiny, tmp_path):
    # One input per model call: 8000 calls, seconds of work, far past the 0.5 s graceful timeout.
    srv = ProcessServer(tiny["export"], tmp_path / "server.log", "--max-batch-tokens", "32", "--model-batch-size",
                        "1", "--graceful-timeout", "0.5")
    try:
        srv.wait_ready()
        jobs = [[f"request {i} sentence {j} " * 6 for j in range(2000)] for i in range(4)]
        with httpx.Client(base_url=srv.url, timeout=120) as http, concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(http.post, "/v1/embeddings", json={"model": tiny["export"].name, "input": job})
                       for job in jobs]
            deadline = time.monotonic() + 30
            while metric(srv.url, "peft_export_requests_in_flight ") < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            srv.process.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        code = srv.process.wait(timeout=60)
    finally:
        srv.stop()
    log = srv.log()
    assert code == 0, log
    cut = [r for r in responses if r.status_code == 503]
    assert cut, [r.status_code for r in responses]
    for response in cut:
        assert response.headers["content-type"] == "application/json"
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "shutting_down"
    assert all(r.status_code in (200, 503) for r in responses)
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert f"{len(cut)} request(s) still running when the graceful timeout expired were answered 503" in log


# ----- 43: protocol errors are JSON; smuggling-shaped framing is refused -----
@pytest.mark.parametrize("request_bytes, fragment", [
    (b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     "Content-Length"),
    (b"POST /embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
     "Content-Length"),
    (b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
     "Duplicate Content-Length"),
    (b"POST /embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", "chunk size"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: gzip\r\n\r\nabc",
     "Content-Length"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "Invalid"),
])
def test_protocol_errors_are_json_400(server, request_bytes, fragment):
    sock = connect(server.port)
    sock.sendall(request_bytes)
    message = json_error(read_response(sock), 400, "invalid_http")
    assert fragment in message
    sock.close()


def test_huge_headers_are_431_json(server):
    sock = connect(server.port)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(32):  # 2 MB in 64 kB pieces; the server answers and closes after the first 64 kB
            sock.sendall(b"a" * 65536)
    except OSError:
        pass
    message = json_error(read_response(sock), 431, "headers_too_large")
    assert "65536 bytes" in message
    sock.close()


def _whole_request(extra_headers: bytes) -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: x\r\n" + extra_headers + b"Connection: close\r\n\r\n"


@pytest.mark.parametrize("extra", [
    pytest.param(b"X-Big: " + b"a" * 100_000 + b"\r\n", id="one-100kB-header"),
    pytest.param(b"".join(b"X-%d: v\r\n" % i for i in range(10_000)), id="10000-small-headers"),
])
def test_header_block_over_the_limit_sent_at_once_is_431_json(server, extra):
    # The whole request in one send: the parser reaches the end of the headers within one read, so the limit must
    # be counted as it parses, not only between reads.
    sock = connect(server.port)
    try:
        sock.sendall(_whole_request(extra))
    except OSError:
        pass
    message = json_error(read_response(sock), 431, "headers_too_large")
    assert "65536 bytes" in message
    sock.close()


def test_header_block_under_the_limit_sent_at_once_is_served(server):
    sock = connect(server.port)
    sock.sendall(_whole_request(b"X-Big: " + b"a" * 60_000 + b"\r\n"))
    status, _, body = read_response(sock)
    assert status == 200, body
    sock.close()


def test_unknown_routes_and_methods_are_counted_in_metrics(server):
    for i in range(5):
        assert httpx.get(f"{server.url}/no/such/route/{i}", timeout=5).status_code == 404
    assert httpx.delete(server.url + "/v1/embeddings", timeout=5).status_code == 405
    text = httpx.get(server.url + "/metrics", timeout=5).text
    assert 'peft_export_requests_total{model="-",route="<unmatched>",status="404"} 5.0' in text
    assert 'peft_export_requests_total{model="-",route="<unmatched>",status="405"} 1.0' in text
    assert "/no/such/route" not in text  # the label is bounded, whatever the path


def test_when_every_connection_runs_a_request_a_new_one_gets_503_json():
    """At the cap with nothing to evict (both connections are running requests), a third client is refused
    at once with 503 + Retry-After instead of being left hanging."""
    import asyncio

    import uvicorn
    from serve_support import free_port, wait_until

    from peft_export.serve.connections import ConnectionLimits, guarded_protocol_class

    release = threading.Event()
    reasons: list[str] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await asyncio.to_thread(release.wait, 10)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    protocol = guarded_protocol_class(ConnectionLimits(max_connections=2), reasons.append)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    busy = []
    try:
        wait_until(lambda: server.started, timeout=30, what="uvicorn start")
        for _ in range(2):
            sock = connect(port)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            busy.append(sock)
        time.sleep(0.3)  # both requests are inside the app
        third = connect(port)
        status, headers, body = read_response(third, timeout=5)
        assert status == 503 and headers["retry-after"] == "1", (status, body)
        assert "limit of 2 open connections" in json.loads(body)["error"]["message"]
        third.close()
        release.set()
        assert all(read_response(sock)[0] == 200 for sock in busy)
        assert reasons == ["too_many_connections"]
    finally:
        release.set()
        for sock in busy:
            sock.close()
        server.should_exit = True
        thread.join(timeout=30)
