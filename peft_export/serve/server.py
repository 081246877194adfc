"""Run an app with uvicorn: loopback by default, graceful shutdown on SIGTERM with exit status 0."""

from __future__ import annotations

import signal

from ..errors import require


def run_server(app, host: str = "127.0.0.1", port: int = 8080, *, graceful_timeout_s: float = 30.0,
               log_level: str = "info", access_log: bool = False) -> None:
    """Serve ``app`` until SIGTERM or Ctrl+C.

    On SIGTERM uvicorn stops accepting connections, lets requests in flight finish (up to ``graceful_timeout_s``),
    runs the app's shutdown (the batcher drains) and returns normally, so the process exits 0.
    """
    uvicorn = require("uvicorn", "serve")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=graceful_timeout_s, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it shut down on once it is done, with the handler that was installed before it
    # started. SIGTERM's default handler would end the process with status -15; a clean drain deserves 0, so
    # the handler it finds is a no-op. (Ctrl+C keeps its KeyboardInterrupt.)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()  # exits the process itself (status 1) if the port cannot be bound
    finally:
        signal.signal(signal.SIGTERM, previous)
