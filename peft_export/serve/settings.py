"""ServeSettings: the limits and batching knobs of the HTTP server, checked once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class ServeSettings:
    """Limits and batching behaviour of ``create_app``; every field is also a ``peft-export serve`` flag.

    The defaults follow the OpenAI embeddings API where clients depend on it (2048 inputs per request) and
    text-embeddings-inference elsewhere (token-budget batching, 429 when the queue is full).
    """

    #: Name the base model answers to in the ``model`` field (default: the export folder's name).
    served_model_name: str | None = None
    #: Adapter used by the TEI routes when the body names no ``model`` (default: the base model).
    default_adapter: str | None = None
    #: Inputs in one request; one more is a 422. OpenAI's own limit, so LangChain/LlamaIndex batches fit.
    max_inputs_per_request: int = 2048
    #: Characters in one input, checked before tokenization so a huge string costs no tokenizer time.
    max_input_chars: int = 100_000
    #: Request body size in bytes; larger bodies get a 413 before they are parsed.
    max_request_bytes: int = 16 * 1024 * 1024
    #: Inputs accepted but not yet answered, over all requests; beyond it a request gets 429 + Retry-After.
    max_concurrent_inputs: int = 8192
    #: Tokens (after truncation) accepted but not yet answered; beyond it a request gets 429 + Retry-After
    #: (a request bigger than this is accepted when nothing else is in flight).
    max_concurrent_tokens: int = 512 * 1024
    #: Token budget of one model call: queued inputs of one adapter are merged until their tokens reach it.
    max_batch_tokens: int = 8192
    #: How long the oldest queued input may wait for company before its batch runs anyway.
    max_batch_delay_ms: float = 2.0
    #: Sentences per ONNX Runtime run inside one model call (EmbeddingModel.encode's batch_size).
    model_batch_size: int = 32
    #: Truncate inputs longer than the model's max_seq_length when the request does not say (else 422).
    auto_truncate: bool = False
    #: Seconds a client is told to wait in the Retry-After header of a 429.
    retry_after_seconds: int = 1
    #: Warm the model up (every adapter) before /health turns 200.
    warmup: bool = True
    #: Seconds a request may take to deliver its headers (from the connection's start); then 408 and close.
    header_timeout_s: float = 10.0
    #: Seconds a request may take to deliver its body once the headers are in; then 408 and close.
    body_timeout_s: float = 60.0
    #: Open connections; at the cap the one waiting longest for a request is closed (503 if all are busy).
    max_connections: int = 2048
    #: Bytes of request line + headers; more is a 431.
    max_header_bytes: int = 64 * 1024
    #: Switchable ONNX Runtime exports: how many adapters to keep merged into their own session (the hottest, by
    #: recent requests; LRU eviction; see serve/merged_budget.py). None or 0: none beyond ``--merge-adapter``.
    merged_adapter_budget: int | None = None

    def __post_init__(self) -> None:
        positive = ("max_inputs_per_request", "max_input_chars", "max_request_bytes", "max_concurrent_inputs",
                    "max_concurrent_tokens", "max_batch_tokens", "model_batch_size", "retry_after_seconds",
                    "max_connections", "max_header_bytes")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ServeSettings.{name} must be a positive integer, found {value!r}")
        budget = self.merged_adapter_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ConfigError(f"ServeSettings.merged_adapter_budget must be a count of adapters >= 0, found {budget!r}")
        if not isinstance(self.max_batch_delay_ms, (int, float)) or not 0 <= self.max_batch_delay_ms <= 1000:
            raise ConfigError(f"ServeSettings.max_batch_delay_ms must be in 0..1000, found {self.max_batch_delay_ms!r}")
        for name in ("header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise ConfigError(f"ServeSettings.{name} must be a number of seconds in (0, 3600], found {value!r}")
        if self.max_concurrent_inputs < self.max_inputs_per_request:
            raise ConfigError(
                f"max_concurrent_inputs ({self.max_concurrent_inputs}) is below max_inputs_per_request "
                f"({self.max_inputs_per_request}): a full-size request could never be accepted; raise the first "
                "or lower the second"
            )


# The fields that `peft-export serve` exposes as --FIELD-NAME flags: (field, type, help).
LIMIT_FLAGS = (
    ("max_inputs_per_request", int, "inputs in one request; more is a 422"),
    ("max_input_chars", int, "characters per input, checked before tokenizing; more is a 422"),
    ("max_request_bytes", int, "request body size; more is a 413"),
    ("max_concurrent_inputs", int, "inputs in flight over all requests; more is a 429 with Retry-After"),
    ("max_concurrent_tokens", int, "tokens in flight over all requests; more is a 429 with Retry-After"),
    ("max_batch_tokens", int, "token budget of one merged model call"),
    ("max_batch_delay_ms", float, "longest wait of a queued input for company"),
    ("model_batch_size", int, "sentences per ONNX Runtime run inside a model call"),
    ("retry_after_seconds", int, "seconds in the Retry-After header of a 429"),
    ("header_timeout_s", float, "seconds a request may take to send its headers; then 408 and close"),
    ("body_timeout_s", float, "seconds a request may take to send its body after the headers; then 408 and close"),
    ("max_connections", int, "open connections; at the cap the longest-waiting idle one is closed"),
    ("max_header_bytes", int, "bytes of request line and headers; more is a 431"),
)


def port_number(text: str, lowest: int = 0) -> int:
    """argparse type of ``--port``: an integer in ``lowest``..65535 (0 asks the system for any free port)."""
    import argparse

    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number ({lowest}-65535)") from None
    if not lowest <= port <= 65535:
        what = "0-65535 (0: any free port)" if lowest == 0 else f"{lowest}-65535"
        raise argparse.ArgumentTypeError(f"{port} is not a port number; expected {what}")
    return port


def add_limit_arguments(parser, title: str) -> None:
    """The ``--max-*`` limit flags of LIMIT_FLAGS and ``--auto-truncate`` as one argparse group, for every command
    that serves (``serve``, ``serve-ray``)."""
    limits = parser.add_argument_group(title)
    for field, kind, text in LIMIT_FLAGS:
        default = getattr(ServeSettings, field)
        limits.add_argument("--" + field.replace("_", "-"), type=kind, default=default,
                            help=f"{text} (default: {default})")
    limits.add_argument("--auto-truncate", action="store_true",
                        help="truncate inputs over max_seq_length when the request does not say (default: 422)")
