"""Start `peft-export serve` (or another HTTP server) as a subprocess on 127.0.0.1, wait until it answers /health,
stop it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .child import REPO_ROOT, child_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    exit_status: int | None = None  # set when stopped


def start_serve(export: str | Path | list[str | Path], serve_args: list[str], log_path: Path, *,
                repo: Path | None = None, port: int | None = None) -> Server:
    """`python -m peft_export.cli serve EXPORT...` on 127.0.0.1 with the peft_export of ``repo`` (default: this
    checkout); ``export`` is one folder or a list of exports (PATH or NAME=PATH: several in one server); its output
    goes to ``log_path``. Not yet ready: see :func:`wait_ready`."""
    port = port or free_port()
    repo = Path(repo or REPO_ROOT)
    exports = [str(e) for e in export] if isinstance(export, list) else [str(export)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "peft_export.cli", "serve", *exports, "--host",
                                    "127.0.0.1", "--port", str(port), "--log-level", "warning", *serve_args],
                                   stdout=log, stderr=subprocess.STDOUT, env=child_env(repo), cwd=repo)
    return Server(process, f"http://127.0.0.1:{port}")


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 300) -> None:
    """Poll ``url``/health until it answers 200; raise when ``process`` exits first or after ``timeout`` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} before it answered {url}/health")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout:.0f} s")


def stop(process: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM, then wait; the exit status (SIGKILL after ``timeout`` seconds)."""
    process.terminate()
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@contextmanager
def served(export: str | Path | list[str | Path], serve_args: list[str], log_path: Path, *,
           repo: Path | None = None, timeout: float = 300) -> Iterator[Server]:
    """A ready `peft-export serve` for the ``with`` block, stopped after it (also when it raises)."""
    server = start_serve(export, serve_args, log_path, repo=repo)
    try:
        wait_ready(server.url, server.process, timeout)
        yield server
    finally:
        server.exit_status = stop(server.process)
