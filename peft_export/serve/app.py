"""``create_app``: the Starlette application serving one exported model (and its adapters) over HTTP.

What every served model has lives here: the lifespan (dynamic batcher, warm-up), limits, metrics and errors, and
the task-independent routes ``GET /v1/models``, ``GET /health`` (readiness), ``GET /live`` (liveness) and
``GET /metrics`` (Prometheus). The model's task adds its own routes (``Task.routes``, a function of the
:class:`ModelServer`): for the embedding task ``POST /v1/embeddings`` (OpenAI), ``POST /embed`` and
``POST /similarity`` (text-embeddings-inference), see :mod:`.embedding_routes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import require
from ..tasks import load_reference
from .batching import DynamicBatcher
from .metrics import NO_MODEL, ServeMetrics
from .protocol import ApiError, dumps
from .served_model import ServedModel, served_task
from .settings import ServeSettings

logger = logging.getLogger("peft_export.serve")

# The route label of requests that matched no route (unknown path or method): one label, whatever the path.
UNMATCHED_ROUTE = "<unmatched>"
# Counting tokens of bigger requests than this (in characters) moves to a thread, keeping the event loop free.
_COUNT_IN_THREAD_CHARS = 50_000


class _ClientGone(Exception):
    """The client disconnected before its results were ready."""


class RequestInfo:
    """Per-request facts the metrics need, filled in as the request is parsed."""

    __slots__ = ("model",)

    def __init__(self) -> None:
        self.model = NO_MODEL


class ModelServer:
    """State and task-independent handlers behind ``create_app``; reachable as ``app.state.server`` (tests, the
    task's routes)."""

    def __init__(self, model: Any, settings: ServeSettings):
        self.settings = settings
        self.served = ServedModel(model, settings)
        self.metrics = ServeMetrics()
        self.batcher: DynamicBatcher | None = None
        self.status = "starting"  # -> "warming_up" -> "ready" | "failed"
        self.cut_off_at_shutdown = 0  # requests answered 503 because the graceful timeout expired

    # ----- lifecycle -----
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.batcher = DynamicBatcher(
            self.served.encode_group,
            max_batch_tokens=self.settings.max_batch_tokens,
            max_delay_s=self.settings.max_batch_delay_ms / 1000,
            max_concurrent_inputs=self.settings.max_concurrent_inputs,
            max_concurrent_tokens=self.settings.max_concurrent_tokens,
            on_batch=lambda group, n, tokens, s: self.metrics.record_batch(self.served.label(group[0]), n, tokens, s),
        )
        for name in self.served.names:
            adapter = None if name == self.served.base_name else name
            self.metrics.watch_queue(name, lambda a=adapter: self.batcher.queued_inputs(lambda g: g[0] == a))
        self.metrics.watch_inflight(lambda: self.batcher.inflight_inputs, lambda: self.batcher.inflight_tokens)
        merged = getattr(self.served.model, "merged_adapters", None)
        if self.served.adapters and merged is not None:
            for name in self.served.adapters:
                self.metrics.watch_merged(name, lambda n=name: n in merged())
        self.batcher.start()
        warm_up = asyncio.get_running_loop().create_task(self._warm_up())
        try:
            yield
        finally:
            warm_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warm_up
            await self.batcher.stop()
            self.served.close()
            logger.info("batcher stopped; %d inputs were still in flight", self.batcher.inflight_inputs)
            if self.cut_off_at_shutdown:
                logger.warning("%d request(s) still running when the graceful timeout expired were answered 503",
                               self.cut_off_at_shutdown)

    async def _warm_up(self) -> None:
        """Run every adapter once (short and max-length inputs) before declaring the server ready."""
        self.status = "warming_up"
        try:
            if self.settings.warmup:
                for adapter in [None, *self.served.adapters]:
                    await self.batcher.run_in_model_thread(self.served.encode_group, (adapter, None),
                                                           self.served.warmup_inputs)
        except Exception as err:
            logger.exception("warm-up failed")
            self.status = f"failed: {type(err).__name__}: {err}"
            return
        self.status = "ready"
        self.metrics.ready.set(1)
        logger.info("model warmed up; serving %s", ", ".join(self.served.names))

    # ----- plumbing shared by every task's routes -----
    def endpoint(self, route: str, shape: str,
                 handler: Callable[[Any, RequestInfo], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
        """Wrap ``handler``: render ApiError in the route family's shape, record metrics, hide tracebacks."""
        from starlette.requests import ClientDisconnect
        from starlette.responses import Response

        async def run(request):
            started = time.perf_counter()
            info = RequestInfo()
            reason = None
            try:
                response = await handler(request, info)
            except ApiError as err:
                response, reason = self.error_response(err, shape), err.code
            except (_ClientGone, ClientDisconnect):
                response, reason = Response(status_code=499), "client_disconnected"
            except asyncio.CancelledError:
                # uvicorn cancels the requests still running when --graceful-timeout expires; answer them like any
                # refusal (JSON 503, retry elsewhere or later) instead of its text/plain 500 and a traceback each.
                self.cut_off_at_shutdown += 1
                retry = self.settings.retry_after_seconds
                err = ApiError(503, "shutting_down", "The server is shutting down and its graceful timeout expired "
                               f"before this request finished; retry in {retry} s",
                               headers={"Retry-After": str(retry)})
                response, reason = self.error_response(err, shape), err.code
            except Exception:
                logger.exception("unexpected error on %s", route)
                err = ApiError(500, "internal_error", "The server failed to process the request; see its log")
                response, reason = self.error_response(err, shape), err.code
            self.metrics.record_response(route, info.model, response.status_code,
                                         time.perf_counter() - started, reason)
            return response

        return run

    @staticmethod
    def error_response(err: ApiError, shape: str):
        from starlette.responses import Response

        body = err.openai_body() if shape == "openai" else err.tei_body()
        return Response(dumps(body), status_code=err.status, media_type="application/json", headers=err.headers)

    async def token_counts(self, texts: list[str], prompt: str, truncate: bool, field: str, single: bool
                           ) -> tuple[list[str], list[int]]:
        """What to embed per input and its tokens after truncation; 422 for an input over the model's limit unless
        ``truncate``. Long inputs are measured on a prefix (ServedModel.measure), never tokenized whole."""
        if sum(map(len, texts)) + len(prompt) * len(texts) > _COUNT_IN_THREAD_CHARS:
            measured, counts = await asyncio.to_thread(self.served.measure, texts, prompt)
        else:
            measured, counts = self.served.measure(texts, prompt)
        limit = self.served.max_tokens
        if not truncate:
            for i, count in enumerate(counts):
                if count > limit:
                    where = field if single else f"{field}[{i}]"
                    found = f"more than {limit}" if len(measured[i]) < len(texts[i]) else str(count)
                    raise ApiError(422, "too_many_tokens",
                                   f"{where} has {found} tokens; the model takes at most {limit}. Shorten it or "
                                   "send truncate=true to embed its first tokens.", param=where)
        return measured, [min(c, limit) for c in counts]

    async def submit(self, request, group: tuple, texts: list[str], tokens: list[int]) -> Any:
        """Queue the inputs in batch ``group`` (its first item: the adapter, None for the base), wait for their
        results; 429 when full, cancelled when the client goes away."""
        job = self.batcher.try_submit(group, texts, tokens)
        if job is None:
            retry = self.settings.retry_after_seconds
            if self.batcher.over_token_budget(tokens):
                what = (f"{self.settings.max_concurrent_tokens} tokens in flight ({self.batcher.inflight_tokens} "
                        f"now, this request has {sum(tokens)})")
            else:
                what = (f"{self.settings.max_concurrent_inputs} inputs in flight ({self.batcher.inflight_inputs} "
                        f"now, this request has {len(texts)})")
            raise ApiError(429, "queue_full", f"The server is at its limit of {what}; retry in {retry} s",
                           headers={"Retry-After": str(retry)})
        disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
        self.metrics.requests_in_flight.inc()
        try:
            await asyncio.wait({job.future, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (forced shutdown): free the slots before propagating
            self.batcher.cancel(job)
            raise
        finally:
            disconnected.cancel()
            self.metrics.requests_in_flight.dec()
        if not job.future.done():
            self.batcher.cancel(job)
            raise _ClientGone()
        results = job.future.result()
        name = self.served.label(group[0])
        self.metrics.inputs.labels(name).inc(len(texts))
        self.metrics.tokens.labels(name).inc(sum(tokens))
        return results

    def tei_adapter(self, body: dict[str, Any], info: RequestInfo) -> str | None:
        """The adapter of a request whose ``model`` field is optional (TEI's routes): None or absent is the
        server's default adapter."""
        if body.get("model") is None:
            adapter = self.served.default_adapter
        else:
            adapter = self.served.adapter_for(body["model"])
        info.model = self.served.label(adapter)
        return adapter

    # ----- plain routes -----
    async def models(self, request):
        created = int(time.time())
        data = [{"id": self.served.base_name, "object": "model", "created": created, "owned_by": "peft_export",
                 "root": self.served.base_name, "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "peft_export",
                  "root": self.served.base_name, "parent": self.served.base_name} for name in self.served.adapters]
        return json_response({"object": "list", "data": data})

    async def health(self, request):
        ready = self.status == "ready"
        return json_response({"status": self.status}, 200 if ready else 503)

    async def live(self, request):
        return json_response({"status": "alive"})

    async def prometheus(self, request):
        from starlette.responses import Response

        payload, content_type = self.metrics.render()
        return Response(payload, media_type=content_type)

    async def not_found(self, request, exc):
        status = getattr(exc, "status_code", 404)
        code = "method_not_allowed" if status == 405 else "not_found"
        message = f"{request.method} {request.url.path} is not a route of this server"
        self.metrics.record_response(UNMATCHED_ROUTE, NO_MODEL, status, None, code)
        return self.error_response(ApiError(status, code, message), "openai")


async def _wait_for_disconnect(request) -> None:
    """Returns when the client closes the connection (the body has been read: only disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def json_response(payload: Any, status: int = 200):
    from starlette.responses import Response

    return Response(dumps(payload), status_code=status, media_type="application/json")


def create_app(model: Any, settings: ServeSettings | None = None):
    """A Starlette (ASGI) app serving ``model``: run it with uvicorn, or mount it in another app.

    ``model`` is an ``EmbeddingModel`` (or anything with its ``encode`` signature); adapters listed by
    ``model.list_adapters()`` are served under their own names. The routes of its task come first
    (:func:`served_task`, ``Task.routes``), then the task-independent ones. The app warms the model up in the
    background: ``/live`` answers at once, ``/health`` turns 200 when warm.
    """
    require("starlette", "serve")
    from starlette.applications import Starlette
    from starlette.routing import Route

    task = served_task(model)
    server = ModelServer(model, settings or ServeSettings())
    routes = [
        *load_reference(task.routes)(server),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/live", server.live, methods=["GET"]),
        Route("/metrics", server.prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=server.lifespan,
                    exception_handlers={404: server.not_found, 405: server.not_found})
    app.state.server = server
    return app
