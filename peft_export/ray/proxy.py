"""A middleware for Ray Serve's HTTP proxy: a request that got no response becomes a JSON 503 with Retry-After.

When the replica running a request dies (killed, out of memory, its node lost), Ray Serve's proxy gets a
``RayActorError``, sends nothing, and its HTTP server answers ``500 Internal Server Error`` in text/plain. The
request was not answered and embedding is idempotent, so the client should retry it: this middleware answers
such requests with the server's JSON error shape, status 503 and ``Retry-After``, as ``peft-export serve`` does for
work cut off at shutdown. Responses that started (every answer of the app, errors included) pass unchanged.

Ray Serve loads it in the proxy process from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=
peft_export.ray.proxy:proxy_middlewares``; ``peft-export serve-ray`` sets that for the Ray instance it starts.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("peft_export.ray.proxy")

RETRY_AFTER_SECONDS = 1


class AnswerUnansweredRequests:
    """Pure ASGI middleware: after the wrapped app returns or raises without starting a response, send a JSON 503
    with Retry-After (see the module doc)."""

    def __init__(self, app, retry_after_seconds: int = RETRY_AFTER_SECONDS):
        self.app, self.retry_after_seconds = app, retry_after_seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            if started:
                raise
            logger.warning("a request failed before it was answered; answered 503", exc_info=True)
        if not started:
            await send_unavailable(send, self.retry_after_seconds)


async def send_unavailable(send, retry_after_seconds: int) -> None:
    from ..serve.protocol import ApiError, send_error

    await send_error(send, ApiError(503, "replica_unavailable",
                                    "The replica running this request stopped before answering (Ray Serve replaces "
                                    f"it); retry in {retry_after_seconds} s",
                                    headers={"Retry-After": str(retry_after_seconds)}))


def proxy_middlewares() -> list:
    """The middlewares for Ray Serve's proxy (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names this)."""
    from starlette.middleware import Middleware

    return [Middleware(AnswerUnansweredRequests)]
