"""The reranker task's routes: ``POST /rerank`` (text-embeddings-inference) and ``POST /v1/rerank`` (the
Cohere / Jina shape) for models with one label, and TEI's ``POST /predict`` (every label's score of each pair) for
any number of labels, on the task-independent server of :mod:`.app` (batching by pairs, limits, metrics, errors).
The reranker task names :func:`reranker_routes` as its ``routes``; its batch call is ``CrossEncoderModel.predict``
(``Task.batch_call``), in batch groups ``(adapter, option)``: ``option`` as tasks/reranker.py's ``batch_options``
says (the model's scores, the raw logits, or /predict's softmax / sigmoid of them), paired with the request's prompt
where it names one (``prompt_name`` or ``prompt``, as ``CrossEncoder.predict`` takes them)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from .app import ModelServer, RequestInfo, json_response
from .protocol import (ApiError, check_truncation_direction, json_type, parse_bool, parse_optional_string,
                       parse_texts, read_json_body)

# Characters of a request above which its pairs are measured in a thread, keeping the event loop free.
_MEASURE_IN_THREAD_CHARS = 50_000
_PAIRS = "a pair [text, text] or a list of pairs [[text, text], ...]"


def reranker_routes(server: ModelServer) -> list[Any]:
    """The Starlette routes of the reranker exports served by ``server``'s group (built once for all of them)."""
    from starlette.routing import Route

    handlers = RerankHandlers(server)
    return [
        Route("/rerank", server.endpoint("/rerank", "tei", handlers.tei_rerank), methods=["POST"]),
        Route("/v1/rerank", server.endpoint("/v1/rerank", "openai", handlers.v1_rerank), methods=["POST"]),
        Route("/predict", server.endpoint("/predict", "tei", handlers.tei_predict), methods=["POST"]),
    ]


def labels_of(model: Any) -> list[str]:
    """The name of each of ``model``'s labels (its ``id2label``; ``LABEL_i`` for a model without one)."""
    count = int(getattr(model, "num_labels", 1))
    names = getattr(model, "id2label", None) or {}
    return [str(names.get(i, f"LABEL_{i}")) for i in range(count)]


def parse_pairs(value: Any, max_inputs: int, max_chars: int) -> tuple[list[tuple[str, str]], bool]:
    """TEI's ``/predict`` ``inputs``: one pair ``[a, b]`` or a list of pairs, and whether it was one pair. Each text
    is checked as ``parse_texts`` checks an input; a single text (TEI's classifiers take one) is refused, since a
    cross-encoder export scores pairs."""
    if value is None:
        raise ApiError(422, "missing_field", f"Field 'inputs' is required: {_PAIRS}", param="inputs")
    if isinstance(value, str) or (isinstance(value, list) and len(value) == 1 and isinstance(value[0], str)):
        raise ApiError(422, "single_text", "Field 'inputs' is one text; this model scores pairs of texts. Send "
                       f"{_PAIRS}", param="inputs")
    if not isinstance(value, list):
        raise ApiError(422, "invalid_type", f"Field 'inputs' must be {_PAIRS}, found {json_type(value)}",
                       param="inputs")
    if not value:
        raise ApiError(422, "empty_input", f"Field 'inputs' is an empty list; send {_PAIRS}", param="inputs")
    single = not isinstance(value[0], list)
    items = [value] if single else value
    if len(items) > max_inputs:
        raise ApiError(422, "too_many_inputs", f"Field 'inputs' has {len(items)} inputs; the limit is {max_inputs} "
                       "per request. Split the request.", param="inputs")
    pairs = []
    for i, item in enumerate(items):
        where = "inputs" if single else f"inputs[{i}]"
        if not isinstance(item, list) or len(item) != 2:
            found = f"a list of {len(item)}" if isinstance(item, list) else json_type(item)
            raise ApiError(422, "invalid_pair", f"{where} must be a pair [text, text], found {found}", param=where)
        first, second = parse_texts(item, where, 2, max_chars)[0]
        pairs.append((first, second))
    return pairs, single


def document_text(document: Any, i: int) -> str:
    """The text of ``documents[i]`` of /v1/rerank: a string, or an object ``{"text": string, ...}`` as Cohere and
    Jina take it; anything else is a 422 saying both forms (parse_texts then checks the text itself)."""
    if isinstance(document, str):
        return document
    if isinstance(document, dict):
        text = document.get("text")
        if isinstance(text, str):
            return text
        found = "no 'text'" if "text" not in document else f"'text' of type {json_type(text)}"
        raise ApiError(422, "missing_field" if "text" not in document else "invalid_type",
                       f"documents[{i}] is an object with {found}; a document object needs 'text': a string",
                       param=f"documents[{i}].text")
    raise ApiError(422, "invalid_type", f"documents[{i}] must be a string or an object {{\"text\": string}}, "
                   f"found {json_type(document)}", param=f"documents[{i}]")


class RerankHandlers:
    def __init__(self, server: ModelServer):
        self.server = server

    async def _scores(self, request, body: dict[str, Any], server: ModelServer, adapter: str | None, option: Any,
                      firsts: str | list[str], seconds: list[str], truncate: bool, subject: str, param: str
                      ) -> tuple[np.ndarray, int]:
        """Rows of ``server``'s export with ``adapter`` and the prompt ``body`` names for the (first, second)
        pairs, in order (``firsts``: one query for every second text, or one first text per pair), and the tokens
        they took; 422 for a pair over the model's limit unless ``truncate``, naming it by ``subject`` and
        ``param`` (formats of its index ``i``). The batch group ``(adapter, option[, prompt])`` keeps each
        adapter's and each prompt's pairs in batches of their own."""
        served = server.served
        prompt = served.pair_prompt(parse_optional_string(body, "prompt_name"), parse_optional_string(body, "prompt"),
                                    server.settings.max_input_chars)
        given = firsts
        one_query = isinstance(firsts, str)
        measure = served.measure_pairs if one_query else served.measure_text_pairs
        chars = len(firsts) if one_query else sum(map(len, firsts))
        if chars + sum(map(len, seconds)) + len(prompt or "") > _MEASURE_IN_THREAD_CHARS:
            firsts, measured, counts = await asyncio.to_thread(measure, firsts, seconds, prompt)
        else:
            firsts, measured, counts = measure(firsts, seconds, prompt)
        limit = served.max_tokens
        if not truncate:
            if one_query and len(firsts) < len(given):
                # The query was measured on a prefix: it alone is over the limit, so every pair is, by an unknown
                # count (its prefix's count in a pair's message would be a wrong figure, naming a text's index).
                raise ApiError(422, "too_many_tokens",
                               f"query has more than {limit} tokens; the model takes at most {limit} per (query, "
                               "text) pair. Shorten it or send truncate=true to score its first tokens.",
                               param="query")
            for i, count in enumerate(counts):
                if count > limit:
                    # A long text was measured on a prefix: its pair is known to be over, not by how much.
                    cut = len(measured[i]) < len(seconds[i]) or (not one_query and len(firsts[i]) < len(given[i]))
                    found = f"more than {limit}" if cut else str(count)
                    raise ApiError(422, "too_many_tokens",
                                   f"{subject.format(i=i)} have {found} tokens; the model takes at most {limit}. "
                                   "Shorten them or send truncate=true to score their first tokens.",
                                   param=param.format(i=i))
        tokens = [min(c, limit) for c in counts]
        pairs = [(firsts if one_query else firsts[i], text) for i, text in enumerate(measured)]
        group_option = option if prompt is None else (option, prompt)
        rows = await server.submit(request, (adapter, group_option), pairs, tokens)
        return np.asarray(rows, dtype=np.float32).reshape(len(pairs), -1), sum(tokens)

    def _one_score(self, server: ModelServer, info: RequestInfo) -> None:
        """/rerank and /v1/rerank rank by one score per pair: a model with several labels is a 400 naming them
        and /predict."""
        labels = labels_of(server.served.model)
        if len(labels) != 1:
            raise ApiError(400, "several_labels",
                           f"Model {info.model!r} has {len(labels)} labels ({', '.join(labels)}); /rerank and "
                           "/v1/rerank rank by one score per pair. Send its pairs to POST /predict, which returns "
                           "every label's score", param="model")

    def _query(self, body: dict[str, Any]) -> str:
        """The one query string (a list of them is refused as a type, not against a per-request count)."""
        query = body.get("query")
        if query is None:
            raise ApiError(422, "missing_field", "Field 'query' is required: the query string", param="query")
        if not isinstance(query, str):
            raise ApiError(422, "invalid_type", f"Field 'query' must be a string, found {json_type(query)}",
                           param="query")
        return parse_texts(query, "query", 1, self.server.settings.max_input_chars)[0][0]

    async def tei_rerank(self, request, info: RequestInfo):
        """TEI: {query, texts, raw_scores, return_text, truncate} -> [{index, score, text?}], best first; with
        ``prompt_name`` or ``prompt`` (as ``CrossEncoder.predict`` takes them; on every reranker route)."""
        s = self.server.settings
        body = await read_json_body(request, s.max_request_bytes)
        server, adapter = self.server.select(body, info, required=False)
        self._one_score(server, info)
        query = self._query(body)
        if isinstance(body.get("texts"), str):
            raise ApiError(422, "invalid_type", "Field 'texts' must be a list of strings, found string",
                           param="texts")
        texts, _ = parse_texts(body.get("texts"), "texts", s.max_inputs_per_request, s.max_input_chars)
        raw = parse_bool(body, "raw_scores", False)
        return_text = parse_bool(body, "return_text", False)
        truncate = parse_bool(body, "truncate", s.auto_truncate)
        check_truncation_direction(body)
        rows, _ = await self._scores(request, body, server, adapter, raw, query, texts, truncate,
                                     "query + texts[{i}]", "texts[{i}]")
        scores = rows[:, 0]
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
        self._one_score(server, info)
        query = self._query(body)
        documents = body.get("documents")
        if isinstance(documents, str):
            raise ApiError(422, "invalid_type", "Field 'documents' must be a list of strings, found string",
                           param="documents")
        if isinstance(documents, list) and len(documents) <= s.max_inputs_per_request:  # else parse_texts' 422
            documents = [document_text(d, i) for i, d in enumerate(documents)]
        documents, _ = parse_texts(documents, "documents", s.max_inputs_per_request, s.max_input_chars)
        top_n = body.get("top_n")
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            raise ApiError(422, "invalid_top_n", f"Field 'top_n' must be a positive integer, found {top_n!r:.40}",
                           param="top_n")
        return_documents = parse_bool(body, "return_documents", False)
        truncate = parse_bool(body, "truncate", True)
        rows, tokens = await self._scores(request, body, server, adapter, False, query, documents, truncate,
                                          "query + documents[{i}]", "documents[{i}]")
        scores = rows[:, 0]
        order = np.argsort(-scores, kind="stable")[:top_n]
        results = [{"index": int(i), "relevance_score": float(scores[i]),
                    **({"document": {"text": documents[i]}} if return_documents else {})} for i in order]
        return json_response({"model": body["model"], "results": results, "usage": {"total_tokens": tokens}})

    async def tei_predict(self, request, info: RequestInfo):
        """TEI: {inputs: [a, b] or [[a, b], ...], raw_scores, truncate, truncation_direction} -> per pair, every
        label's {score, label}, best first (one list for one pair, a list of lists for a list of pairs). As TEI
        does: a softmax over the logits of several labels, the sigmoid of one label's logit, the logits
        themselves with raw_scores; labels from the model's id2label."""
        s = self.server.settings
        body = await read_json_body(request, s.max_request_bytes)
        server, adapter = self.server.select(body, info, required=False)
        pairs, single = parse_pairs(body.get("inputs"), s.max_inputs_per_request, s.max_input_chars)
        raw = parse_bool(body, "raw_scores", False)
        truncate = parse_bool(body, "truncate", s.auto_truncate)
        check_truncation_direction(body)
        model = server.served.model
        labels = labels_of(model)
        if raw:
            option: Any = True
        elif len(labels) > 1:
            option = "softmax"
        else:  # a sigmoid model's own scores are TEI's: they share /rerank's batches
            option = False if getattr(model, "activation_fn", None) == "sigmoid" else "sigmoid"
        rows, _ = await self._scores(request, body, server, adapter, option, [a for a, _ in pairs],
                                     [b for _, b in pairs], truncate, "the texts of inputs[{i}]", "inputs[{i}]")
        predictions = [[{"score": float(row[j]), "label": labels[j]} for j in np.argsort(-row, kind="stable")]
                       for row in rows]
        return json_response(predictions[0] if single else predictions)
