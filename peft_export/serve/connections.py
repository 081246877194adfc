"""Connection hygiene under uvicorn: read timeouts, a cap on open connections, JSON protocol errors.

uvicorn closes a keep-alive connection that stays idle after a response, but nothing else: a client that opens a
connection and sends half a request (or one byte per second) holds a file descriptor for ever, and twenty
thousand of them exhaust the process. ``guarded_protocol_class`` returns a subclass of uvicorn's httptools
protocol that

* gives each request ``header_timeout_s`` to deliver its headers (counted from the connection's start, or from
  the first byte after a keep-alive pause) and ``body_timeout_s`` more for its body; past either it answers
  408 with a JSON error and closes the connection (a connection that sent nothing is closed silently);
* caps open connections at ``max_connections``: at the cap a new connection closes the one that has waited
  longest for a request (idle keep-alive or partial request) so new clients are served throughout; when every
  open connection is running a request, the new one gets 503 + Retry-After;
* refuses headers over ``max_header_bytes`` with 431 (counted between reads and as the parser hands them over,
  so a header block that arrives in one read is held to it too), and answers every parser error (conflicting
  Content-Length, Content-Length together with Transfer-Encoding, a bad chunk size) with a JSON 400 instead of
  uvicorn's text/plain "Invalid HTTP request received.".

``AcceptErrorLog`` is an event-loop exception handler that turns accept() failures (EMFILE, ENFILE, ...) into at
most one log line per interval, instead of a traceback per failed accept.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import require
from .protocol import ApiError, dumps

logger = logging.getLogger("peft_export.serve")

# File descriptors kept free for the model, log files and the listening socket when the cap is derived from
# the process limit.
_RESERVED_FDS = 64
_ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}

# Called with the reason of each connection closed or refused below the application (metrics count them).
ProtocolObserver = Callable[[str], None]


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 2048
    max_header_bytes: int = 64 * 1024
    retry_after_seconds: int = 1


def effective_max_connections(requested: int) -> int:
    """``requested``, lowered to what the process's open-file limit can hold (with a reserve for everything else)."""
    try:
        import resource
    except ImportError:  # not a Unix: no such limit to respect
        return requested
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    allowed = max(8, soft - _RESERVED_FDS)
    if allowed < requested:
        logger.warning("max_connections lowered from %d to %d: the process may open %d files (ulimit -n)",
                       requested, allowed, soft)
    return min(requested, allowed)


def _raw_json_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response with an OpenAI-shaped JSON error, written below the ASGI app."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE

    body = dumps(ApiError(status, code, message).openai_body())
    lines = [STATUS_LINE[status], b"content-type: application/json\r\n",
             b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    return b"".join(lines) + b"\r\n" + body


class _Registry:
    """Per-server bookkeeping: connections waiting for a request, oldest first (the eviction order)."""

    def __init__(self) -> None:
        self.waiting: OrderedDict[object, None] = OrderedDict()


def guarded_protocol_class(limits: ConnectionLimits, observer: ProtocolObserver | None = None) -> type:
    """uvicorn's httptools protocol with read timeouts, a connection cap and JSON protocol errors (see module)."""
    httptools = require("httptools", "serve")
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    max_connections = effective_max_connections(limits.max_connections)
    observe = observer or (lambda reason: None)

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            registry = getattr(self.server_state, "peft_export_connections", None)
            if registry is None:
                registry = self.server_state.peft_export_connections = _Registry()
            self._registry = registry
            self._timer: asyncio.TimerHandle | None = None
            self._phase = "idle"  # idle -> headers -> body -> busy -> (response) idle
            self._header_bytes = 0  # bytes received while the headers are incomplete
            self._parsed_header_bytes = 0  # request line and headers as the parser hands them over
            self._refusal: tuple[int, str, str] | None = None

        # ----- connection lifecycle -----
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections and not self._evict_one():
                self._refuse(503, "too_many_connections",
                             f"The server is at its limit of {max_connections} open connections, all running "
                             f"requests; retry in {limits.retry_after_seconds} s",
                             {"Retry-After": str(limits.retry_after_seconds)})
                return
            self._mark_waiting()
            self._arm(limits.header_timeout_s)

        def connection_lost(self, exc) -> None:
            self._disarm()
            self._registry.waiting.pop(self, None)
            super().connection_lost(exc)

        def _evict_one(self) -> bool:
            """Close the connection that has waited longest for a request; False when none is waiting."""
            for victim in self._registry.waiting:
                if victim is not self:
                    victim._timed_out(reason="evicted")
                    return True
            return False

        def _mark_waiting(self) -> None:
            self._registry.waiting[self] = None
            self._registry.waiting.move_to_end(self)

        # ----- timers -----
        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._timed_out)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _timed_out(self, reason: str = "read_timeout") -> None:
            self._timer = None
            self._registry.waiting.pop(self, None)
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if self._phase == "body" and cycle is not None and not cycle.response_complete:
                # The app is waiting for the rest of the body: it sees a disconnect, the client sees 408.
                cycle.disconnected = True
                cycle.message_event.set()
                if cycle.response_started:
                    self.transport.close()
                    return
            elif self._phase not in ("headers", "body") and self._header_bytes == 0:
                self.transport.close()  # nothing sent since the connection (or the last response): just close
                observe(f"idle_{reason}")
                return
            limit = limits.header_timeout_s if self._phase != "body" else limits.body_timeout_s
            part = "body" if self._phase == "body" else "headers"
            message = (f"The request's {part} did not arrive within {limit:g} s; the connection is closed"
                       if reason == "read_timeout" else
                       "The server is at its connection limit and closed this connection, which had not sent a "
                       "complete request")
            self._refuse(408, reason, message)

        # ----- refusals below the app -----
        def _refuse(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
            self._disarm()
            self._registry.waiting.pop(self, None)
            if self.transport.is_closing():
                return
            self.transport.write(_raw_json_response(status, code, message, headers))
            self.transport.close()
            observe(code)

        def send_400_response(self, msg: str) -> None:  # uvicorn calls this on any parser error
            status, code, message = self._refusal or (400, "invalid_http", f"Invalid HTTP request: {msg}".rstrip(": "))
            self._refusal = None
            self._refuse(status, code, message)

        # ----- parsing -----
        def data_received(self, data: bytes) -> None:
            if self._phase == "idle" and self._timer is None:  # first byte after a keep-alive pause
                self._arm(limits.header_timeout_s)
            # uvicorn's own data_received, with the parser's reason in the (JSON) 400 and no warning per bad request
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
            except httptools.HttpParserError as err:
                reason = str(err.__context__ or err) if self._refusal is None else ""
                logger.debug("invalid HTTP request: %s", reason)
                self.send_400_response(reason)
                return
            if self._phase not in ("idle", "headers"):
                return
            # Still inside the headers: count them (a chunk that completes them may carry body bytes: not counted).
            self._header_bytes += len(data)
            if self._header_bytes > limits.max_header_bytes and not self.transport.is_closing():
                self._refuse(431, "headers_too_large",
                             f"Request headers exceed the limit of {limits.max_header_bytes} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._phase = "headers"
            self._parsed_header_bytes = 0

        # A whole header block can arrive in one read and be parsed (up to the end of the request) within one
        # feed_data, before data_received can count it: the parser's callbacks count it as it is parsed.
        def on_url(self, url: bytes) -> None:
            self._count_header_bytes(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_header_bytes(len(name) + len(value) + 4)  # ": " and CRLF
            super().on_header(name, value)

        def _count_header_bytes(self, size: int) -> None:
            self._parsed_header_bytes += size
            if self._parsed_header_bytes > limits.max_header_bytes:
                self._refusal = (431, "headers_too_large",
                                 f"Request headers exceed the limit of {limits.max_header_bytes} bytes")
                raise ValueError("headers too large")  # parsing stops; send_400_response answers the 431

        def on_headers_complete(self) -> None:
            names = {name for name, _ in self.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                # llhttp refuses most of these already; this keeps the rule whatever the parser's leniency.
                self._refusal = (400, "invalid_http", "A request may not carry both Content-Length and "
                                 "Transfer-Encoding (request smuggling); send one of them")
                raise ValueError("content-length with transfer-encoding")  # parsing stops; send_400_response runs
            super().on_headers_complete()
            self._phase = "body"
            self._header_bytes = 0
            self._registry.waiting.pop(self, None)
            self._arm(limits.body_timeout_s)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm()
            if self._phase == "drain":  # the app had answered before the body ended; now the connection waits
                self._become_idle()
            else:
                self._phase = "busy"

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing() or self.pipeline or not (self.cycle is None or self.cycle.response_complete):
                return  # closing, or a pipelined request is now running
            if self._phase == "body":  # answered (e.g. 413) while the body still arrives: its bytes are no headers
                self._phase = "drain"
                return
            self._become_idle()

        def _become_idle(self) -> None:
            # uvicorn's keep-alive timer now watches the idle connection; ours restarts at its next byte.
            self._phase = "idle"
            self._header_bytes = 0
            self._mark_waiting()

    GuardedHttpToolsProtocol.max_connections = max_connections
    return GuardedHttpToolsProtocol


class AcceptErrorLog:
    """Event-loop exception handler: accept() failures logged at most once per ``interval_s``, with a count.

    asyncio logs a full traceback for every failed accept (hundreds of thousands a minute when descriptors run
    out); everything else goes to the loop's default handler unchanged.
    """

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] | None = None):
        self.interval_s = interval_s
        self._clock = clock
        self.suppressed = 0
        self.total = 0
        self._last: float | None = None

    @staticmethod
    def is_accept_error(context: dict) -> bool:
        exc = context.get("exception")
        if str(context.get("message", "")).startswith("socket.accept()"):
            return True
        handle = repr(context.get("handle", ""))
        return "_accept_connection" in handle or ("_start_serving" in handle and isinstance(exc, ValueError)) or (
            isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS and "accept" in str(context.get("message")))

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if not self.is_accept_error(context):
            loop.default_exception_handler(context)
            return
        self.total += 1
        now = (self._clock or loop.time)()
        if self._last is not None and now - self._last < self.interval_s:
            self.suppressed += 1
            return
        exc = context.get("exception")
        more = f" (and {self.suppressed} more since the last report)" if self.suppressed else ""
        logger.error("accepting a connection failed: %s%s; open connections are capped by --max-connections",
                     exc if exc is not None else context.get("message"), more)
        self._last = now
        self.suppressed = 0
