"""The reranker task's routes: ``POST /rerank`` (text-embeddings-inference) and ``POST /v1/rerank`` (the
Cohere / Jina shape), on the task-independent server of :mod:`.app` (batching by pairs, limits, metrics, errors).
The reranker task names :func:`reranker_routes` as its ``routes``; its batch call is ``CrossEncoderModel.predict``
(``Task.batch_call``), in batch groups ``(adapter, raw)``: ``raw`` True for the logits, else the model's scores."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from ..errors import ConfigError
from .app import ModelServer, RequestInfo, json_response
from .protocol import ApiError, json_type, parse_bool, parse_texts, read_json_body

# Characters of a request above which its pairs are measured in a thread, keeping the event loop free.
_MEASURE_IN_THREAD_CHARS = 50_000


def reranker_routes(server: ModelServer) -> list[Any]:
    """The Starlette routes of a reranker served by ``server`` (a model with one label: rank() needs one score)."""
    from starlette.routing import Route

    for peer in server.peers():  # every reranker export served: the routes are built once for all of them
        num_labels = getattr(peer.served.model, "num_labels", 1)
        if num_labels != 1:
            raise ConfigError(f"Serving reranks with one score per pair; {peer.served.base_name} has num_labels="
                              f"{num_labels}. Use CrossEncoderModel.predict() in Python for multi-label models.")
    handlers = RerankHandlers(server)
    return [
        Route("/rerank", server.endpoint("/rerank", "tei", handlers.tei_rerank), methods=["POST"]),
        Route("/v1/rerank", server.endpoint("/v1/rerank", "openai", handlers.v1_rerank), methods=["POST"]),
    ]


class RerankHandlers:
    def __init__(self, server: ModelServer):
        self.server = server

    async def _scores(self, request, server: ModelServer, adapter: str | None, query: str, documents: list[str],
                      truncate: bool, field: str, raw: bool = False) -> tuple[np.ndarray, int]:
        """Scores of (query, document) pairs by ``server``'s export with ``adapter``, in document order, and the
        tokens they took; 422 for a pair over the model's limit unless ``truncate``. The batch group ``(adapter,
        raw)`` keeps each adapter's pairs in batches of their own."""
        served = server.served
        if len(query) + sum(map(len, documents)) > _MEASURE_IN_THREAD_CHARS:
            query, measured, counts = await asyncio.to_thread(served.measure_pairs, query, documents)
        else:
            query, measured, counts = served.measure_pairs(query, documents)
        limit = served.max_tokens
        if not truncate:
            for i, count in enumerate(counts):
                if count > limit:
                    # A long document was measured on a prefix: its pair is known to be over, not by how much.
                    found = f"more than {limit}" if len(measured[i]) < len(documents[i]) else str(count)
                    raise ApiError(422, "too_many_tokens",
                                   f"query + {field}[{i}] have {found} tokens; the model takes at most {limit}. "
                                   "Shorten them or send truncate=true to score their first tokens.",
                                   param=f"{field}[{i}]")
        tokens = [min(c, limit) for c in counts]
        scores = await server.submit(request, (adapter, raw), [(query, d) for d in measured], tokens)
        return np.asarray(scores, dtype=np.float32).reshape(-1), sum(tokens)

    def _query(self, body: dict[str, Any]) -> str:
        query, _ = parse_texts(body.get("query"), "query", 1, self.server.settings.max_input_chars)
        if not isinstance(body.get("query"), str):
            raise ApiError(422, "invalid_type", f"Field 'query' must be a string, found {json_type(body['query'])}",
                           param="query")
        return query[0]

    async def tei_rerank(self, request, info: RequestInfo):
        """TEI: {query, texts, raw_scores, return_text, truncate} -> [{index, score, text?}], best first."""
        s = self.server.settings
        body = await read_json_body(request, s.max_request_bytes)
        server, adapter = self.server.select(body, info, required=False)
        query = self._query(body)
        if isinstance(body.get("texts"), str):
            raise ApiError(422, "invalid_type", "Field 'texts' must be a list of strings, found string",
                           param="texts")
        texts, _ = parse_texts(body.get("texts"), "texts", s.max_inputs_per_request, s.max_input_chars)
        raw = parse_bool(body, "raw_scores", False)
        return_text = parse_bool(body, "return_text", False)
        truncate = parse_bool(body, "truncate", s.auto_truncate)
        scores, _ = await self._scores(request, server, adapter, query, texts, truncate, "texts", raw)
        order = np.argsort(-scores, kind="stable")
        results = [{"index": int(i), "score": float(scores[i]), **({"text": texts[i]} if return_text else {})}
                   for i in order]
        return json_response(results)

    async def v1_rerank(self, request, info: RequestInfo):
        """Cohere / Jina: {model, query, documents, top_n, return_documents} -> {model, results: [{index,
        relevance_score, document?}], usage}, best first."""
        s = self.server.settings
        body = await read_json_body(request, s.max_request_bytes)
        server, adapter = self.server.select(body, info, required=True)
        query = self._query(body)
        documents = body.get("documents")
        if isinstance(documents, list):  # Cohere and Jina also take {"text": ...} objects
            documents = [d["text"] if isinstance(d, dict) and isinstance(d.get("text"), str) else d
                         for d in documents]
        if isinstance(documents, str):
            raise ApiError(422, "invalid_type", "Field 'documents' must be a list of strings, found string",
                           param="documents")
        documents, _ = parse_texts(documents, "documents", s.max_inputs_per_request, s.max_input_chars)
        top_n = body.get("top_n")
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            raise ApiError(422, "invalid_top_n", f"Field 'top_n' must be a positive integer, found {top_n!r:.40}",
                           param="top_n")
        return_documents = parse_bool(body, "return_documents", False)
        truncate = parse_bool(body, "truncate", True)
        scores, tokens = await self._scores(request, server, adapter, query, documents, truncate, "documents")
        order = np.argsort(-scores, kind="stable")[:top_n]
        results = [{"index": int(i), "relevance_score": float(scores[i]),
                    **({"document": {"text": documents[i]}} if return_documents else {})} for i in order]
        return json_response({"model": body["model"], "results": results, "usage": {"total_tokens": tokens}})
