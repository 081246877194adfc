"""Prometheus metrics of one app, in a registry of its own (two apps in one process do not collide).

The ``model`` label only ever holds a served name (the base or an adapter) or ``"-"`` when the request named
none that exists: a label filled from raw request text would let any client create unbounded time series.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import require

NO_MODEL = "-"
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServeMetrics:
    def __init__(self) -> None:
        prom = require("prometheus_client", "serve")
        self._prom = prom
        self.registry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = prom.Counter("peft_export_requests", "HTTP requests answered, by route, model and status",
                                     ["route", "model", "status"], registry=r)
        self.failures = prom.Counter("peft_export_request_failures",
                                     "Requests that did not get a 2xx, by route, model and reason",
                                     ["route", "model", "reason"], registry=r)
        self.latency = prom.Histogram("peft_export_request_duration_seconds",
                                      "Time from request start to response, by route and model",
                                      ["route", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inputs = prom.Counter("peft_export_inputs", "Inputs answered: texts embedded, or (query, text) pairs "
                                   "scored by a reranker", ["model"], registry=r)
        self.tokens = prom.Counter("peft_export_tokens", "Tokens of the inputs answered (after truncation; a pair's "
                                   "with its special tokens)", ["model"], registry=r)
        self.batch_size = prom.Histogram("peft_export_batch_size", "Inputs per model call", ["model"],
                                         buckets=_SIZE_BUCKETS, registry=r)
        self.batch_tokens = prom.Histogram("peft_export_batch_tokens", "Tokens per model call", ["model"],
                                           buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_duration = prom.Histogram("peft_export_batch_duration_seconds", "Duration of one model call",
                                             ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = prom.Gauge("peft_export_queue_depth", "Inputs waiting for a model call",
                                      ["model"], registry=r)
        self.inflight = prom.Gauge("peft_export_inputs_in_flight",
                                   "Inputs accepted and not yet answered (the 429 limit applies to this)",
                                   registry=r)
        self.inflight_tokens = prom.Gauge("peft_export_tokens_in_flight",
                                          "Tokens of the inputs in flight (max_concurrent_tokens applies to this)",
                                          registry=r)
        self.requests_in_flight = prom.Gauge("peft_export_requests_in_flight",
                                             "Requests accepted into the queue and not yet answered",
                                             registry=r)
        self.connections_closed = prom.Counter(
            "peft_export_connections_closed", "Connections closed or refused below the routes (read timeout, "
            "connection cap, protocol error), by reason", ["reason"], registry=r)
        self.ready = prom.Gauge("peft_export_ready", "1 once the model is loaded and warmed up", registry=r)
        self.merged = prom.Gauge("peft_export_adapter_merged",
                                 "1 while the adapter runs merged into its own session, 0 on the LoRA branches",
                                 ["model"], registry=r)

    def watch_queue(self, model: str, depth: Callable[[], int]) -> None:
        self.queue_depth.labels(model).set_function(depth)

    def watch_merged(self, model: str, merged: Callable[[], bool]) -> None:
        self.merged.labels(model).set_function(lambda: float(merged()))

    def watch_inflight(self, inputs: Callable[[], int], tokens: Callable[[], int]) -> None:
        self.inflight.set_function(inputs)
        self.inflight_tokens.set_function(tokens)

    def record_batch(self, model: str, inputs: int, tokens: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(inputs)
        self.batch_tokens.labels(model).observe(tokens)
        self.batch_duration.labels(model).observe(seconds)

    def record_response(self, route: str, model: str, status: int, seconds: float | None,
                        reason: str | None = None) -> None:
        self.requests.labels(route, model, str(status)).inc()
        if status >= 400:
            self.failures.labels(route, model, reason or str(status)).inc()
        if seconds is not None:
            self.latency.labels(route, model).observe(seconds)

    def record_connection_closed(self, reason: str) -> None:
        self.connections_closed.labels(reason).inc()  # reasons are fixed strings of serve.connections

    def render(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST
