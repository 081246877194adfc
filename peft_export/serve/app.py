"""``create_app``: the Starlette application serving one exported model (and its adapters) over HTTP, or several
exports in one process, each with its own batcher, chosen by the request's ``model`` (:mod:`.model_group`).

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
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..errors import require
from ..tasks import load_reference
from .batching import DynamicBatcher
from .metrics import NO_MODEL, ServeMetrics
from .model_group import ModelGroup, export_settings
from .protocol import ApiError, dumps, json_response, show
from .served_model import ServedModel, served_task  # noqa: F401 (served_task: part of this module's API)
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
    """One served export: its model, batcher and warm-up, and the task-independent plumbing its task's routes use;
    reachable as ``app.state.server`` (the first export; ``app.state.group`` holds them all)."""

    def __init__(self, model: Any, settings: ServeSettings, metrics: ServeMetrics | None = None):
        self.settings = settings
        self.served = ServedModel(model, settings)
        self.metrics = metrics or ServeMetrics()  # one registry for every export of a server, labelled by model
        self.group: ModelGroup | None = None  # set by the ModelGroup this export is served in
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
        self.group.warmed_up()
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

    def select(self, body: dict[str, Any], info: RequestInfo, required: bool) -> tuple[ModelServer, str | None]:
        """(export, adapter) of a request to a route of this export's task: ``body["model"]`` names the export
        and the adapter (ModelGroup.select); absent, it is 422 where ``required``, else the task's first export
        with its default adapter. A task's routes queue the request on the export this returns."""
        return self.group.select(self.served.task, body, info, required)

    def peers(self) -> list[ModelServer]:
        """Every served export of this export's task (the routes are built once per task)."""
        return self.group.of_task(self.served.task)

    def tei_adapter(self, body: dict[str, Any], info: RequestInfo) -> str | None:
        """The adapter of a request whose ``model`` field is optional (TEI's routes), for routes that queue on this
        export: None or absent is the export's default adapter. Routes of a task served by several exports use
        :meth:`select`, which also says which export."""
        server, adapter = self.select(body, info, required=False)
        if server is not self:
            raise ApiError(400, "wrong_model_task", f"Model {show(body.get('model'))} is served by another export; "
                           f"this route serves {self.served.base_name} ({', '.join(self.served.names)})",
                           param="model")
        return adapter

    # ----- plain routes -----
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


def create_app(model: Any | Mapping[str, Any], settings: ServeSettings | None = None):
    """A Starlette (ASGI) app serving ``model``: run it with uvicorn, or mount it in another app.

    ``model`` is an ``EmbeddingModel``, a ``CrossEncoderModel`` (or anything with their call's signature);
    adapters listed by ``model.list_adapters()`` are served under their own names. A mapping ``{name: model}``
    serves several exports (an embedder and a reranker), each under its name with its own batcher, chosen by the
    request's ``model`` (:mod:`.model_group`). The routes of each task served come first (:func:`served_task`,
    ``Task.routes``), then the task-independent ones. The app warms every model up in the background: ``/live``
    answers at once, ``/health`` turns 200 when all are warm.
    """
    require("starlette", "serve")
    from starlette.applications import Starlette
    from starlette.routing import Route

    settings = settings or ServeSettings()
    if isinstance(model, Mapping):
        metrics = ServeMetrics()
        per_export = export_settings(model, settings)
        servers = [ModelServer(m, per_export[name], metrics) for name, m in model.items()]
    else:
        servers = [ModelServer(model, settings)]
    first = servers[0] if servers else None
    group = ModelGroup(servers, first.metrics if first else ServeMetrics(), settings)
    routes = [route for task in group.tasks() for route in load_reference(task.routes)(group.of_task(task)[0])]
    routes += [
        Route("/v1/models", group.models, methods=["GET"]),
        Route("/health", group.health, methods=["GET"]),
        Route("/live", first.live, methods=["GET"]),
        Route("/metrics", first.prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=group.lifespan,
                    exception_handlers={404: first.not_found, 405: first.not_found})
    app.state.server = first
    app.state.group = group
    return app
