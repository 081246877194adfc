"""Several exports in one server: an embedder and a reranker of one RAG stack, each with its own batcher, chosen
by the request's ``model``.

A :class:`ModelGroup` holds one :class:`.app.ModelServer` per export. Every name a request may give (an export's
served name, or one of its adapters) belongs to exactly one export, so ``model`` picks the export and the adapter
at once; a name of an export of another task (an embedder named on ``/v1/rerank``) is a 400 naming both tasks.
The group answers the task-independent routes for all of them: ``/v1/models`` lists every export's names,
``/health`` is ready only when every export is warm, and the metrics are one registry labelled by model name.
A group of one export behaves exactly as a single-export server always did.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..errors import ConfigError
from ..tasks import Task
from .metrics import ServeMetrics
from .protocol import ApiError, json_response, json_type, show
from .settings import ServeSettings

# What the group holds: app.ModelServer (one export) and app.RequestInfo, which import this module, so they are
# only named here.
ModelServer = Any
RequestInfo = Any


def export_settings(models: Mapping[str, Any], settings: ServeSettings) -> dict[str, ServeSettings]:
    """Each export's settings when several are served: its name as ``served_model_name``; ``default_adapter``
    for the export that has that adapter only; the merged-adapter budget for exports with adapters only."""
    adapters = {name: [str(a) for a in getattr(model, "list_adapters", lambda: [])()] for name, model in models.items()}
    if settings.served_model_name is not None:
        raise ConfigError("served_model_name names the one export of a single-export server; with several exports, "
                          "name each one (NAME=PATH)")
    if settings.default_adapter is not None and not any(settings.default_adapter in a for a in adapters.values()):
        raise ConfigError(f"--default-adapter {settings.default_adapter!r} is not an adapter of any served export; "
                          f"they have {', '.join(repr(a) for names in adapters.values() for a in names) or 'none'}")
    if settings.merged_adapter_budget and not any(adapters.values()):
        raise ConfigError(f"--merged-adapter-budget {settings.merged_adapter_budget} needs a switchable export with "
                          "adapters; none of the served exports has any")
    return {name: replace(settings, served_model_name=name,
                          default_adapter=settings.default_adapter if settings.default_adapter in adapters[name]
                          else None,
                          merged_adapter_budget=settings.merged_adapter_budget if adapters[name] else None)
            for name in models}


class ModelGroup:
    """The exports one server serves, in the order given, and the routes every export shares."""

    def __init__(self, servers: list[ModelServer], metrics: ServeMetrics, settings: ServeSettings):
        if not servers:
            raise ConfigError("A server needs at least one export to serve")
        self.servers = servers
        self.metrics = metrics
        self.settings = settings
        self._by_name: dict[str, ModelServer] = {}
        for server in servers:
            for name in server.served.names:
                other = self._by_name.get(name)
                if other is not None:
                    raise ConfigError(
                        f"The name {name!r} is served by two exports ({other.served.base_name} and "
                        f"{server.served.base_name}); a request's model must name one. Serve them under other names "
                        "(NAME=PATH), or rename an adapter")
                self._by_name[name] = server
        for server in servers:
            server.group = self

    # ----- which export a request names -----
    def of_task(self, task: Task) -> list[ModelServer]:
        return [server for server in self.servers if server.served.task is task]

    def tasks(self) -> list[Task]:
        """The tasks served, in the order their first export was given."""
        found: list[Task] = []
        for server in self.servers:
            if server.served.task not in found:
                found.append(server.served.task)
        return found

    def select(self, task: Task, body: dict[str, Any], info: RequestInfo, required: bool,
               field: str = "model") -> tuple[ModelServer, str | None]:
        """(export, adapter: None for its base) a request to a route of ``task`` names in ``body[field]``. Absent:
        422 where ``required`` (OpenAI-style routes), else the first export of the task with its default adapter
        (TEI routes). Unknown: 404. A name of an export of another task: 400 naming both tasks."""
        candidates = self.of_task(task)
        names = [name for server in candidates for name in server.served.names]
        name = body.get(field)
        if name is None:
            if required:
                raise ApiError(422, "missing_field", f"Field {field!r} is required: the base model's name or an "
                               f"adapter's ({', '.join(names)})", param=field)
            server = candidates[0]
            info.model = server.served.label(server.served.default_adapter)
            return server, server.served.default_adapter
        if not isinstance(name, str):
            raise ApiError(422, "invalid_type", f"Field {field!r} must be a string, found {json_type(name)}",
                           param=field)
        server = self._by_name.get(name)
        if server is None:
            raise ApiError(404, "model_not_found",
                           f"Model {show(name)} is not served here; available: {', '.join(names)}", param=field)
        if server.served.task is not task:
            found = server.served.task.name
            raise ApiError(400, "wrong_model_task",
                           f"Model {show(name)} is a {found} model ({server.served.task.sentence_transformers_class});"
                           f" this route serves {task.name} models ({', '.join(names)}). Send {found} requests to "
                           f"the {found} routes.", param=field)
        adapter = server.served.adapter_for(name, field)
        info.model = server.served.label(adapter)
        return server, adapter

    # ----- lifecycle -----
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.metrics.watch_inflight(lambda: sum(s.batcher.inflight_inputs for s in self.servers if s.batcher),
                                    lambda: sum(s.batcher.inflight_tokens for s in self.servers if s.batcher))
        async with contextlib.AsyncExitStack() as stack:
            for server in self.servers:
                await stack.enter_async_context(server.lifespan(app))
            yield

    def warmed_up(self) -> None:
        """Called by each export when its warm-up ends: the ready gauge turns 1 once every export is ready."""
        self.metrics.ready.set(1 if self.ready else 0)

    @property
    def ready(self) -> bool:
        return all(server.status == "ready" for server in self.servers)

    @property
    def status(self) -> str:
        """One word for all exports: ready only when every one is, else the first failure, else warming up."""
        statuses = [server.status for server in self.servers]
        if all(s == "ready" for s in statuses):
            return "ready"
        return next((s for s in statuses if s.startswith("failed")), next(s for s in statuses if s != "ready"))

    # ----- task-independent routes -----
    async def models(self, request):
        created = int(time.time())
        data = []
        for server in self.servers:
            base = server.served.base_name
            data.append({"id": base, "object": "model", "created": created, "owned_by": "peft_export",
                         "root": base, "parent": None})
            data += [{"id": name, "object": "model", "created": created, "owned_by": "peft_export", "root": base,
                      "parent": base} for name in server.served.adapters]
        return json_response({"object": "list", "data": data})

    async def health(self, request):
        body: dict[str, Any] = {"status": self.status}
        if len(self.servers) > 1:
            body["models"] = {server.served.base_name: server.status for server in self.servers}
        return json_response(body, 200 if self.ready else 503)
