"""Run an app with uvicorn: loopback by default, graceful shutdown on SIGTERM with exit status 0."""

from __future__ import annotations

import asyncio
import errno
import signal
import socket

from ..errors import ConfigError, ListenError, require
from .connections import AcceptErrorLog, ConnectionLimits, guarded_protocol_class


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: any free port; ``getsockname()[1]`` tells which), as uvicorn
    binds it. Bound here rather than by uvicorn, which logs the failure and exits the process with status 3: a busy
    port, an address this machine does not have or a port outside 0-65535 is a ListenError / ConfigError naming
    the address."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an integer in 0-65535 (0: any free port), found {port!r}").in_cli_words(
            f"--port must be in 0-65535 (0: any free port), found {port!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if err.errno == errno.EADDRINUSE:  # (reason, fix for a library caller, fix for peft-export)
            reason, fix, cli_fix = ("the port is already in use", "stop what listens there or pass another port",
                                    "stop what listens there or pass another --port")
        elif err.errno == errno.EACCES:
            reason, fix, cli_fix = ("permission denied", "ports below 1024 need privileges; pass a higher port",
                                    "ports below 1024 need privileges; pass a higher --port")
        else:
            reason = err.strerror or str(err)
            fix, cli_fix = "pass a host of this machine", "pass a --host of this machine"
        error = ListenError(f"Cannot listen on {address}: {reason}; {fix} (0: any free port)")
        raise error.in_cli_words(f"Cannot listen on {address}: {reason}; {cli_fix} (0: any free port)") from err
    return sock


def run_server(app, host: str = "127.0.0.1", port: int = 8080, *, graceful_timeout_s: float = 30.0,
               log_level: str = "info", access_log: bool = False, sock: socket.socket | None = None) -> None:
    """Serve ``app`` until SIGTERM or Ctrl+C, on ``sock`` if given (see :func:`listening_socket`), else on
    ``host``:``port``.

    On SIGTERM uvicorn stops accepting connections, lets requests in flight finish (up to ``graceful_timeout_s``),
    runs the app's shutdown (the batcher drains) and returns normally, so the process exits 0.
    Connections get the read timeouts, cap and JSON protocol errors of ``serve.connections``, with the limits of
    the app's ServeSettings (``create_app`` apps) or the defaults.
    """
    uvicorn = require("uvicorn", "serve")
    served = getattr(getattr(app, "state", None), "server", None)
    settings = getattr(served, "settings", None)
    limits = ConnectionLimits() if settings is None else ConnectionLimits(
        header_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections, max_header_bytes=settings.max_header_bytes,
        retry_after_seconds=settings.retry_after_seconds)
    observer = served.metrics.record_connection_closed if served is not None else None
    protocol = guarded_protocol_class(limits, observer)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=graceful_timeout_s, lifespan="on", http=protocol)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            asyncio.get_running_loop().set_exception_handler(AcceptErrorLog())
            await super().startup(sockets=sockets)

    sock = sock if sock is not None else listening_socket(host, port)
    server = Server(config)
    # uvicorn re-raises the signal it shut down on once it is done, with the handler that was installed before it
    # started. SIGTERM's default handler would end the process with status -15; a clean drain deserves 0, so
    # the handler it finds is a no-op. (Ctrl+C keeps its KeyboardInterrupt.)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
