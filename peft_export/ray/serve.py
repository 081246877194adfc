"""Ray Serve: the ``peft-export serve`` app (same OpenAI and TEI routes, same limits) on replicas of a deployment,
for an export of either task (an embedder's routes, or a reranker's ``/rerank``, ``/v1/rerank`` and ``/predict``).

Each replica is a Ray actor that opens the export once and runs :func:`peft_export.serve.create_app` as its ASGI
ingress (the app itself, not a copy of its routes), with ``num_cpus = threads_per_replica`` reserved and ONNX
Runtime using exactly that many intra-op threads.

Adapters of a switchable export, routed per request: a request names its adapter in the body's ``model`` field, as
with ``peft-export serve``; that field alone decides what is computed. To also have requests for an adapter go to
the replicas where it is merged, the client sends Ray Serve's multiplexing header with the same name::

    serve_multiplexed_model_id: <adapter name>

(``openai.OpenAI(..., default_headers={"serve_multiplexed_model_id": "legal"})``). Ray's proxy sends such requests
to replicas that have that id loaded; on a replica, "loaded" means merged into its own session (the model's
``merge_adapter``), at most ``merged_adapter_budget`` adapters per replica, least recently used evicted first (Ray
Serve's multiplexing LRU; ``unmerge_adapter`` frees the session). A request never waits for a merge: it starts in
the background and, until it is done, the adapter runs through the LoRA branches, which give the same answer (float
rounding, ~1e-7). A header naming neither an adapter of the export nor the base (``served_model_name``) is a JSON
404, as the same name in ``model`` is: never a silent answer from the base. The proxy cannot read request
bodies, hence the header; without it, requests are spread over all replicas and each adapter runs on the LoRA
branches.

    from peft_export.ray import serve_app
    serve.run(serve_app("out/", replicas=2, merged_adapter_budget=4), route_prefix="/")

or ``peft-export serve-ray EXPORT --replicas 2`` (see the CLI), or ``serve run peft_export.ray.serve:build_app
export=out/ replicas=2``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, require
from ..serve.settings import ServeSettings
from .local import keep_replica_grpc_on_loopback

logger = logging.getLogger("peft_export.ray.serve")

MULTIPLEX_HEADER = b"serve_multiplexed_model_id"

# The app of the replica living in this process (Ray runs each replica in its own actor process): set by the
# replica's constructor, read by the ingress builder that Ray Serve calls right after it.
_REPLICA: dict[str, Any] = {}


def _replica_app():
    return _REPLICA["app"]


class _Merged:
    """A merged adapter as Ray Serve's multiplexing holds it: evicting it (``__del__``) unmerges it, once."""

    def __init__(self, model, name: str):
        self.model, self.name, self.live = model, name, True

    def __del__(self):
        if self.live:
            self.live = False
            self.model.unmerge_adapter(self.name)
            logger.info("unmerged adapter %s (evicted by the replica's merged-adapter budget)", self.name)


class _AdapterAffinity:
    """ASGI wrapper of the server app: a request whose multiplexing header names an adapter of the export marks
    that adapter hot on this replica (merged in the background if it is not yet); one whose header names neither
    an adapter nor the base (``base_name``) is answered 404; everything else passes through."""

    def __init__(self, app, adapters: set[str], mark_hot, base_name: str | None = None):
        self.app, self.adapters, self.mark_hot, self.base_name = app, adapters, mark_hot, base_name
        self.state = getattr(app, "state", None)
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            name = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == MULTIPLEX_HEADER), None)
            if name is not None and name != self.base_name and name not in self.adapters:
                await _send_unknown_adapter(send, name, sorted(self.adapters), self.base_name)
                return
            if name in self.adapters and self.mark_hot is not None:
                task = asyncio.ensure_future(self.mark_hot(name))
                self._tasks.add(task)
                task.add_done_callback(self._done)
        await self.app(scope, receive, send)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("merging an adapter failed; it keeps running on the LoRA branches: %r", task.exception())


async def _send_unknown_adapter(send, name: str, adapters: list[str], base_name: str | None) -> None:
    """A JSON 404 for a multiplexing header naming no adapter of the export (and not the base)."""
    from ..serve.protocol import ApiError, send_error, show

    known = ", ".join([n for n in (base_name, *adapters) if n is not None]) or "none"
    await send_error(send, ApiError(404, "model_not_found", f"The {MULTIPLEX_HEADER.decode()} header names "
                                    f"{show(name)}, which is not served here; available: {known}",
                                    param=MULTIPLEX_HEADER.decode()))


def _open_replica(export: str, backend: str | None, threads: int, settings: ServeSettings, mark_hot) -> Any:
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # the tokenizer's pool: as many threads as this replica's CPUs
    keep_replica_grpc_on_loopback()
    from ..serve.app import create_app
    from ..tasks.loading import load

    # The class of the export's task (EmbeddingModel, CrossEncoderModel): its routes are the ones served.
    model = load(export, backend=backend, intra_op_threads=threads)
    adapters = set(model.list_adapters()) if getattr(model, "is_switchable", False) else set()
    _REPLICA["app"] = _AdapterAffinity(create_app(model, settings), adapters, mark_hot if adapters else None,
                                       settings.served_model_name)
    return model


def _deployment_class(budget: int):
    """The replica class; with a budget, it has a ``@serve.multiplexed`` loader that merges adapters."""
    from ray import serve

    if budget:
        class ExportReplica:
            def __init__(self, export: str, backend: str | None, threads: int, settings: ServeSettings):
                self.model = _open_replica(export, backend, threads, settings, self.hot_adapter)

            @serve.multiplexed(max_num_models_per_replica=budget)
            async def hot_adapter(self, name: str) -> _Merged:
                await asyncio.to_thread(self.model.merge_adapter, name)
                return _Merged(self.model, name)
    else:
        class ExportReplica:
            def __init__(self, export: str, backend: str | None, threads: int, settings: ServeSettings):
                self.model = _open_replica(export, backend, threads, settings, None)

    return serve.ingress(_replica_app)(ExportReplica)


def serve_app(export: str | Path, *, replicas: int = 1, threads_per_replica: int = 1,
              merged_adapter_budget: int | None = None, settings: ServeSettings | None = None,
              backend: str | None = None, max_ongoing_requests: int = 64, name: str = "peft-export"):
    """A Ray Serve application (``serve.run(...)`` it) serving ``export`` from ``replicas`` replicas.

    ``export`` must be readable at the same path on every node. ``settings`` are the server's limits
    (``ServeSettings``; its ``merged_adapter_budget`` is ignored in favour of the argument of that name, which is
    per replica and uses Ray's multiplexing, see the module doc). ``served_model_name`` defaults to the folder's
    name, as with ``peft-export serve``.
    """
    require("ray.serve", "ray")
    require("starlette", "serve")
    from ray import serve

    export = Path(export).expanduser().resolve()
    if not export.is_dir():
        raise ConfigError(f"Export folder not found: {export}")
    for field, value in (("replicas", replicas), ("threads_per_replica", threads_per_replica),
                         ("max_ongoing_requests", max_ongoing_requests)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{field} must be a positive integer, found {value!r}")
    budget = merged_adapter_budget or 0
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ConfigError(f"merged_adapter_budget must be a count of adapters >= 0, found {merged_adapter_budget!r}")
    settings = replace(settings or ServeSettings(), merged_adapter_budget=None)
    if settings.served_model_name is None:
        settings = replace(settings, served_model_name=export.name)
    deployment = serve.deployment(
        _deployment_class(budget), name=name, num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": threads_per_replica},
    )
    return deployment.bind(str(export), backend, threads_per_replica, settings)


def build_app(args: dict[str, str]):
    """Builder for ``serve run peft_export.ray.serve:build_app export=DIR [replicas=N] [threads_per_replica=T]
    [merged_adapter_budget=B] [served_model_name=NAME]``."""
    args = dict(args)
    if "export" not in args:
        raise ConfigError("serve run ... build_app needs export=EXPORT_FOLDER")
    export = args.pop("export")
    numbers = {k: int(args.pop(k)) for k in ("replicas", "threads_per_replica", "merged_adapter_budget",
                                             "max_ongoing_requests") if k in args}
    settings = ServeSettings(served_model_name=args.pop("served_model_name", None))
    if args:
        raise ConfigError(f"Unknown build_app arguments: {sorted(args)}")
    return serve_app(export, settings=settings, **numbers)
