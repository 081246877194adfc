"""Request parsing and response shaping shared by the OpenAI and TEI routes.

Every rejection is an ``ApiError`` carrying the HTTP status, a machine-readable code, the offending field
(``param``, e.g. ``input[3]``) and a message that names the limit and the value received. The routes render it
in their family's shape: OpenAI ``{"error": {"message", "type", "param", "code"}}`` or TEI
``{"error", "error_type"}``. No stack trace ever reaches a response body.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from ..errors import require
from ..runtime.similarity import normalize as l2_normalize

orjson = require("orjson", "serve")

ENCODING_FORMATS = ("float", "base64")


class ApiError(Exception):
    """A request the server refuses; rendered as JSON with ``status``."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}

    @property
    def openai_type(self) -> str:
        if self.status == 429:
            return "rate_limit_error"
        return "server_error" if self.status >= 500 else "invalid_request_error"

    @property
    def tei_type(self) -> str:
        if self.status in (429, 503):
            return "Overloaded"
        if self.status == 404:
            return "NotFound"
        return "Backend" if self.status >= 500 else "Validation"

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.openai_type, "param": self.param, "code": self.code}}

    def tei_body(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": self.tei_type}


def json_response(payload: Any, status: int = 200):
    """A JSON response of ``payload`` (orjson: numpy arrays as lists) with ``status``."""
    from starlette.responses import Response

    return Response(dumps(payload), status_code=status, media_type="application/json")


async def send_error(send, error: ApiError) -> None:
    """Answer ``error`` as JSON (the OpenAI error body, with its headers) on a raw ASGI ``send``, below any
    framework: for wrappers of the app that answer a request themselves."""
    body = dumps(error.openai_body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, as a client wrote it: null, boolean, number, string, array, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def show(value: Any, limit: int = 60) -> str:
    """A value as it may appear in an error message: repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def read_json_body(request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past ``max_bytes`` (checked on Content-Length, then while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "payload_too_large",
                       f"Request body is {int(declared)} bytes; the limit is {max_bytes} bytes. Send fewer or "
                       "shorter inputs per request.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "payload_too_large",
                           f"Request body exceeds the limit of {max_bytes} bytes. Send fewer or shorter inputs "
                           "per request.")
        chunks.append(chunk)
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as err:
        raise ApiError(400, "invalid_json", f"Request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", f"Request body must be a JSON object, found {json_type(body)}")
    return body


def parse_texts(value: Any, field: str, max_inputs: int, max_chars: int) -> tuple[list[str], bool]:
    """``value`` (a string or a list of strings) as a list, and whether it was a single string.

    Checks, in this order so that nothing expensive runs on a bad request: presence, type, emptiness,
    count limit, then each item's type, emptiness and length in characters (before any tokenization).
    """
    if value is None:
        raise ApiError(422, "missing_field", f"Field {field!r} is required: a string or a list of strings",
                       param=field)
    single = isinstance(value, str)
    texts = [value] if single else value
    if not isinstance(texts, list):
        raise ApiError(422, "invalid_type",
                       f"Field {field!r} must be a string or a list of strings, found {json_type(value)}",
                       param=field)
    if not texts:
        raise ApiError(422, "empty_input", f"Field {field!r} is an empty list; send at least one string",
                       param=field)
    if len(texts) > max_inputs:
        raise ApiError(422, "too_many_inputs",
                       f"Field {field!r} has {len(texts)} inputs; the limit is {max_inputs} per request. "
                       "Split the request.", param=field)
    for i, text in enumerate(texts):
        where = field if single else f"{field}[{i}]"
        if not isinstance(text, str):
            token_like = isinstance(text, (int, list)) and not isinstance(text, bool)
            hint = " (token arrays are not supported: send text)" if token_like else ""
            raise ApiError(422, "invalid_type",
                           f"{where} must be a string, found {json_type(text)}{hint}", param=where)
        if not text:
            raise ApiError(422, "empty_input", f"{where} is an empty string; every input needs text", param=where)
        if len(text) > max_chars:
            raise ApiError(422, "input_too_long",
                           f"{where} has {len(text)} characters; the limit is {max_chars} per input",
                           param=where)
    return texts, single


def parse_bool(body: dict[str, Any], field: str, default: bool) -> bool:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(422, "invalid_type", f"Field {field!r} must be true or false, found {show(value)}",
                       param=field)
    return value


def check_truncation_direction(body: dict[str, Any]) -> None:
    """TEI's ``truncation_direction``: only "Right" (absent, "Right" or "right"), as the model was trained."""
    direction = body.get("truncation_direction")
    if direction is not None and direction not in ("Right", "right"):
        raise ApiError(422, "invalid_truncation_direction",
                       f"Only truncation_direction 'Right' is supported (as the model was trained), found "
                       f"{show(direction)}", param="truncation_direction")


def parse_dimensions(value: Any, model_dimension: int, field: str = "dimensions") -> int | None:
    """``dimensions``: absent/null, or an integer in 1..model_dimension (bools and floats are refused)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= model_dimension:
        raise ApiError(422, "invalid_dimensions",
                       f"Field {field!r} must be an integer from 1 to {model_dimension} (the model's "
                       f"dimension), found {show(value)}", param=field)
    return value


def parse_encoding_format(value: Any) -> str:
    if value is None:
        return "float"
    if value not in ENCODING_FORMATS:
        raise ApiError(422, "invalid_encoding_format",
                       f"Field 'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}, found {show(value)}",
                       param="encoding_format")
    return value


def parse_optional_string(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise ApiError(422, "invalid_type", f"Field {field!r} must be a string, found {json_type(value)}",
                       param=field)
    return value


def shorten(embeddings: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka truncation to ``dimensions`` columns, then L2 re-normalisation when ``normalize``."""
    if dimensions is not None:
        embeddings = embeddings[:, :dimensions]
    if normalize:
        embeddings = l2_normalize(embeddings)
    return np.ascontiguousarray(embeddings, dtype=np.float32)


def encode_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 format: the little-endian float32 bytes of one vector."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


def dumps(payload: Any) -> bytes:
    """JSON with numpy arrays written natively (float32 printed exactly, about 20x faster than json.dumps)."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
