"""The embedding task's routes: ``POST /v1/embeddings`` and ``POST /embeddings`` (OpenAI), ``POST /embed`` and
``POST /similarity`` (text-embeddings-inference), on the task-independent server of :mod:`.app` (batching, limits,
metrics, errors). The embedding task names :func:`embedding_routes` as its ``routes``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..runtime.similarity import similarity
from .app import ModelServer, RequestInfo, json_response
from .protocol import (
    ApiError,
    check_truncation_direction,
    encode_base64,
    parse_bool,
    parse_dimensions,
    parse_encoding_format,
    parse_optional_string,
    parse_texts,
    read_json_body,
    shorten,
)


def embedding_routes(server: ModelServer) -> list[Any]:
    """The Starlette routes of an embedding model served by ``server``."""
    from starlette.routing import Route

    handlers = EmbeddingHandlers(server)
    return [
        Route("/v1/embeddings", server.endpoint("/v1/embeddings", "openai", handlers.openai_embeddings),
              methods=["POST"]),
        Route("/embeddings", server.endpoint("/embeddings", "openai", handlers.openai_embeddings), methods=["POST"]),
        Route("/embed", server.endpoint("/embed", "tei", handlers.tei_embed), methods=["POST"]),
        Route("/similarity", server.endpoint("/similarity", "tei", handlers.tei_similarity), methods=["POST"]),
    ]


class EmbeddingHandlers:
    """The request handlers of the embedding routes; the export a request names (``ModelServer.select``: one of
    the embedding exports served) parses limits, counts tokens and queues inputs in batch groups ``(adapter,
    prompt name)`` (ServedModel.encode_group)."""

    def __init__(self, server: ModelServer):
        self.server = server

    async def openai_embeddings(self, request, info: RequestInfo):
        s = self.server.settings
        body = await read_json_body(request, s.max_request_bytes)
        server, adapter = self.server.select(body, info, required=True)
        served = server.served
        texts, single = parse_texts(body.get("input"), "input", s.max_inputs_per_request, s.max_input_chars)
        encoding_format = parse_encoding_format(body.get("encoding_format"))
        dimensions = parse_dimensions(body.get("dimensions"), served.dimension)
        truncate = parse_bool(body, "truncate", s.auto_truncate)
        prompt_name = parse_optional_string(body, "prompt_name")
        prompt = served.prompt_text(prompt_name)
        texts, tokens = await server.token_counts(texts, prompt, truncate, "input", single)
        embeddings = await server.submit(request, (adapter, prompt_name), texts, tokens)
        # OpenAI semantics: a shortened vector is re-normalised to unit length.
        embeddings = shorten(embeddings, dimensions, normalize=dimensions is not None)
        encode = encode_base64 if encoding_format == "base64" else (lambda v: v)  # float: orjson writes the array
        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(embeddings)]
        usage = {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
        return json_response({"object": "list", "data": data, "model": body["model"], "usage": usage})

    async def tei_embed(self, request, info: RequestInfo):
        s = self.server.settings
        body = await read_json_body(request, s.max_request_bytes)
        server, adapter = self.server.select(body, info, required=False)
        served = server.served
        texts, single = parse_texts(body.get("inputs"), "inputs", s.max_inputs_per_request, s.max_input_chars)
        normalize = parse_bool(body, "normalize", True)
        truncate = parse_bool(body, "truncate", s.auto_truncate)
        check_truncation_direction(body)
        dimensions = parse_dimensions(body.get("dimensions"), served.dimension)
        prompt_name = parse_optional_string(body, "prompt_name")
        prompt = served.prompt_text(prompt_name)
        texts, tokens = await server.token_counts(texts, prompt, truncate, "inputs", single)
        embeddings = await server.submit(request, (adapter, prompt_name), texts, tokens)
        return json_response(shorten(embeddings, dimensions, normalize))

    async def tei_similarity(self, request, info: RequestInfo):
        s = self.server.settings
        body = await read_json_body(request, s.max_request_bytes)
        server, adapter = self.server.select(body, info, required=False)
        served = server.served
        inputs = body.get("inputs")
        if not isinstance(inputs, dict):
            raise ApiError(422, "missing_field" if inputs is None else "invalid_type",
                           "Field 'inputs' must be an object {\"source_sentence\": str, \"sentences\": [str, ...]}",
                           param="inputs")
        source, _ = parse_texts(inputs.get("source_sentence"), "inputs.source_sentence", 1, s.max_input_chars)
        if isinstance(inputs.get("sentences"), str):
            raise ApiError(422, "invalid_type", "inputs.sentences must be a list of strings, found string",
                           param="inputs.sentences")
        sentences, _ = parse_texts(inputs.get("sentences"), "inputs.sentences", s.max_inputs_per_request - 1,
                                   s.max_input_chars)
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ApiError(422, "invalid_type", "Field 'parameters' must be an object", param="parameters")
        truncate = parse_bool(parameters, "truncate", s.auto_truncate)
        prompt_name = parse_optional_string(parameters, "prompt_name")
        prompt = served.prompt_text(prompt_name, "parameters.prompt_name")
        source, source_tokens = await server.token_counts(source, prompt, truncate, "inputs.source_sentence", True)
        sentences, tokens = await server.token_counts(sentences, prompt, truncate, "inputs.sentences", False)
        embeddings = await server.submit(request, (adapter, prompt_name), source + sentences, source_tokens + tokens)
        scores = similarity(embeddings[:1], embeddings[1:], served.similarity_fn_name)[0]
        return json_response(scores.astype(np.float32))
