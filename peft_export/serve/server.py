"""Run an app with uvicorn: loopback by default, graceful shutdown on SIGTERM with exit status 0."""

from __future__ import annotations

import asyncio
import signal

from ..errors import require
from .connections import AcceptErrorLog, ConnectionLimits, guarded_protocol_class


def run_server(app, host: str = "127.0.0.1", port: int = 8080, *, graceful_timeout_s: float = 30.0,
               log_level: str = "info", access_log: bool = False) -> None:
    """Serve ``app`` until SIGTERM or Ctrl+C.

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

    server = Server(config)
    # uvicorn re-raises the signal it shut down on once it is done, with the handler that was installed before it
    # started. SIGTERM's default handler would end the process with status -15; a clean drain deserves 0, so
    # the handler it finds is a no-op. (Ctrl+C keeps its KeyboardInterrupt.)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()  # exits the process itself (status 1) if the port cannot be bound
    finally:
        signal.signal(signal.SIGTERM, previous)
