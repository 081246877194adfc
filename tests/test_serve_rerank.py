"""Serving a reranker export (issue 25, item 4): TEI's ``POST /rerank`` and the Cohere/Jina ``POST /v1/rerank``
answer what ``CrossEncoderModel.rank`` computes in process, through the task-independent server (batching by
pairs, limits with JSON errors, metrics)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from peft_export import CrossEncoderModel  # noqa: E402
from peft_export.serve.app import create_app  # noqa: E402
from peft_export.serve.settings import ServeSettings  # noqa: E402

QUERY = "How do I reset my password?"
DOCUMENTS = [
    "Open the settings page, choose Security and click 'Reset password'.",
    "Paris is the capital and most populous city of France.",
    "Hi",
    "Passwords can be reset from the account page; a link is sent to your e-mail address within a minute.",
    "The weather is nice today.",
]
LONG = " ".join(["A passage far longer than the model's maximum sequence length."] * 40)


@pytest.fixture(scope="module")
def served(reranker):
    model = CrossEncoderModel(reranker["adapter_export"])
    with TestClient(create_app(model, ServeSettings(max_inputs_per_request=6))) as client:
        yield model, client


def test_tei_rerank_equals_rank_in_process(served):
    model, client = served
    response = client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "return_text": True})
    assert response.status_code == 200, response.text
    want = model.rank(QUERY, DOCUMENTS, return_documents=True)
    got = response.json()
    assert [r["index"] for r in got] == [r["corpus_id"] for r in want]
    assert [r["text"] for r in got] == [r["text"] for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-6)
    raw = client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": True}).json()
    logits = model.predict([(QUERY, d) for d in DOCUMENTS], activation_fn="identity")
    np.testing.assert_allclose([r["score"] for r in sorted(raw, key=lambda r: r["index"])], logits, atol=1e-6)
    assert "text" not in raw[0]


def test_v1_rerank_has_cohere_shape_and_top_n(served):
    model, client = served
    name = model.path.name
    body = {"model": name, "query": QUERY, "documents": [DOCUMENTS[0], {"text": DOCUMENTS[1]}, *DOCUMENTS[2:]],
            "top_n": 2, "return_documents": True}
    response = client.post("/v1/rerank", json=body)
    assert response.status_code == 200, response.text
    got = response.json()
    want = model.rank(QUERY, DOCUMENTS, top_k=2, return_documents=True)
    assert got["model"] == name and got["usage"]["total_tokens"] > 0
    assert [(r["index"], r["document"]["text"]) for r in got["results"]] == [(w["corpus_id"], w["text"]) for w in want]
    np.testing.assert_allclose([r["relevance_score"] for r in got["results"]], [w["score"] for w in want], atol=1e-6)


def test_long_passages_are_refused_unless_truncated(served):
    model, client = served
    refused = client.post("/rerank", json={"query": QUERY, "texts": ["short", LONG]})
    assert refused.status_code == 422
    assert refused.json()["error"].startswith("query + texts[1] have more than 64 tokens; the model takes at most 64")
    truncated = client.post("/rerank", json={"query": QUERY, "texts": ["short", LONG], "truncate": True})
    assert truncated.status_code == 200
    scores = {r["index"]: r["score"] for r in truncated.json()}
    np.testing.assert_allclose([scores[0], scores[1]], model.predict([(QUERY, "short"), (QUERY, LONG)]), atol=1e-6)


@pytest.mark.parametrize(("route", "body", "status", "message"), [
    ("/rerank", {"texts": ["a"]}, 422, "Field 'query' is required"),
    ("/rerank", {"query": "q", "texts": "a"}, 422, "Field 'texts' must be a list of strings, found string"),
    ("/rerank", {"query": "q", "texts": []}, 422, "Field 'texts' is an empty list"),
    ("/rerank", {"query": "q", "texts": ["a", 3]}, 422, "texts[1] must be a string, found number"),
    ("/rerank", {"query": "q", "texts": ["a"] * 7}, 422, "Field 'texts' has 7 inputs; the limit is 6 per request"),
    ("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "Left"}, 422,
     "Only truncation_direction 'Right' is supported (as the model was trained), found 'Left'"),
    ("/v1/rerank", {"query": "q", "documents": ["a"]}, 422, "Field 'model' is required"),
    ("/v1/rerank", {"model": "nope", "query": "q", "documents": ["a"]}, 404, "Model 'nope' is not served here"),
])
def test_bad_requests_get_json_errors(served, route, body, status, message):
    _, client = served
    response = client.post(route, json=body)
    assert response.status_code == status, response.text
    payload = response.json()
    error = payload["error"]["message"] if isinstance(payload["error"], dict) else payload["error"]
    assert error.startswith(message), error


def test_exactly_the_document_limit_is_accepted_and_top_n_is_checked(served):
    model, client = served
    name = model.path.name
    assert client.post("/rerank", json={"query": "q", "texts": ["a"] * 6}).status_code == 200
    bad = client.post("/v1/rerank", json={"model": name, "query": "q", "documents": ["a"], "top_n": 0})
    assert bad.status_code == 422 and "top_n" in bad.json()["error"]["message"]


def test_metrics_and_routes_are_the_rerankers(served):
    model, client = served
    client.post("/v1/rerank", json={"model": model.path.name, "query": "q", "documents": ["a", "b"]})
    assert 'route="/v1/rerank"' in client.get("/metrics").text
    missing = client.post("/v1/embeddings", json={"input": "x", "model": model.path.name})
    assert missing.status_code == 404


# ----- per-request adapters of a switchable reranker -----
@pytest.fixture(scope="module")
def switchable_served(zoo, reranker):
    import reranker_fixtures

    model = CrossEncoderModel(reranker_fixtures.switchable_reranker(zoo, reranker))
    calls = []
    predict = model.predict

    def recording_predict(pairs, **options):  # each batch call, with the adapter it ran
        calls.append((options.get("adapter"), [passage for _, passage in pairs]))
        return predict(pairs, **options)

    model.predict = recording_predict
    with TestClient(create_app(model, ServeSettings(max_batch_delay_ms=50))) as client:
        yield model, client, calls


@pytest.mark.parametrize("name", ["qv", "qk", None])
def test_each_request_picks_its_adapter_on_both_rerank_routes(switchable_served, name):
    model, client, _ = switchable_served
    adapter = name or False  # the base: no adapter
    want = model.rank(QUERY, DOCUMENTS, adapter=adapter)
    v1 = client.post("/v1/rerank", json={"model": name or model.path.name, "query": QUERY, "documents": DOCUMENTS})
    assert v1.status_code == 200, v1.text
    assert [r["index"] for r in v1.json()["results"]] == [w["corpus_id"] for w in want]
    np.testing.assert_allclose([r["relevance_score"] for r in v1.json()["results"]], [w["score"] for w in want],
                               atol=1e-6)
    tei = client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, **({"model": name} if name else {})})
    assert tei.status_code == 200, tei.text
    np.testing.assert_allclose([r["score"] for r in tei.json()], [w["score"] for w in want], atol=1e-6)


def test_the_adapters_score_differently(switchable_served):
    _, client, _ = switchable_served
    scores = {}
    for name in ("qv", "qk"):
        results = client.post("/rerank", json={"model": name, "query": QUERY, "texts": DOCUMENTS}).json()
        scores[name] = np.array([r["score"] for r in sorted(results, key=lambda r: r["index"])])
    assert np.abs(scores["qv"] - scores["qk"]).max() > 1e-3


def test_an_unknown_adapter_is_the_embedding_routes_404(switchable_served):
    model, client, _ = switchable_served
    names = f"{model.path.name}, qv, qk"
    v1 = client.post("/v1/rerank", json={"model": "nope", "query": QUERY, "documents": ["a"]})
    assert v1.status_code == 404
    assert v1.json() == {"error": {"message": f"Model 'nope' is not served here; available: {names}",
                                   "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    tei = client.post("/rerank", json={"model": "../qv", "query": QUERY, "texts": ["a"]})
    assert tei.status_code == 404
    assert tei.json() == {"error": f"Model '../qv' is not served here; available: {names}", "error_type": "NotFound"}


def test_concurrent_requests_for_two_adapters_never_share_a_batch(switchable_served):
    """Mixed traffic: each batch call holds one adapter's pairs only, and every answer equals its request alone."""
    from concurrent.futures import ThreadPoolExecutor

    model, client, calls = switchable_served
    documents = {name: [f"{name} passage {i} about resetting a password" for i in range(6)] for name in ("qv", "qk")}
    calls.clear()

    def ask(name):
        return name, client.post("/v1/rerank", json={"model": name, "query": QUERY, "documents": documents[name]})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, ["qv", "qk"] * 6))
    for name, response in answers:
        assert response.status_code == 200, response.text
        want = model.rank(QUERY, documents[name], adapter=name)
        np.testing.assert_allclose([r["relevance_score"] for r in response.json()["results"]],
                                   [w["score"] for w in want], atol=1e-6)
    served_calls = [(adapter, passages) for adapter, passages in calls if adapter in ("qv", "qk")]
    assert served_calls
    for adapter, passages in served_calls:
        assert all(p.startswith(f"{adapter} passage") for p in passages), (adapter, passages)


# ----- attacks from outside (RELIABILITY items 25-29, 51): each once got through -----
@pytest.mark.parametrize("route", ["/rerank", "/v1/rerank"])
def test_a_query_over_the_token_limit_is_named_without_a_made_up_count(served, route):
    """A long query was measured on a prefix, and the 422 then named texts[0] with that prefix's count ("have 67
    tokens" for a query of over 500): it names the query, and truncation still scores what predict scores."""
    model, client = served
    field = "texts" if route == "/rerank" else "documents"
    body = {"query": LONG, field: ["short", "Hi"], "truncate": False,
            **({"model": model.path.name} if route == "/v1/rerank" else {})}
    refused = client.post(route, json=body)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    message = error["message"] if route == "/v1/rerank" else error
    assert message == ("query has more than 64 tokens; the model takes at most 64 per (query, text) pair. Shorten "
                       "it or send truncate=true to score its first tokens.")
    if route == "/v1/rerank":
        assert (error["code"], error["param"]) == ("too_many_tokens", "query")
    cut = client.post(route, json={**body, "truncate": True})
    assert cut.status_code == 200, cut.text
    results = cut.json() if route == "/rerank" else cut.json()["results"]
    key = "score" if route == "/rerank" else "relevance_score"
    got = [r[key] for r in sorted(results, key=lambda r: r["index"])]
    np.testing.assert_allclose(got, model.predict([(LONG, "short"), (LONG, "Hi")]), atol=1e-6)


@pytest.mark.parametrize("query", [["a", "b"], [], 3, {"text": "q"}, ["q"]])
@pytest.mark.parametrize("route", ["/rerank", "/v1/rerank"])
def test_a_query_that_is_not_a_string_is_refused_as_a_type(served, route, query):
    """A list of queries was answered "Field 'query' has 2 inputs; the limit is 1 per request" (as if two were
    fine elsewhere), [] "an empty list" and a number "must be a string or a list of strings"; the query is one
    string."""
    model, client = served
    field = "texts" if route == "/rerank" else "documents"
    response = client.post(route, json={"model": model.path.name, "query": query, field: ["a"]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    message = error["message"] if route == "/v1/rerank" else error
    found = {list: "array", int: "number", dict: "object"}[type(query)]
    assert message == f"Field 'query' must be a string, found {found}"
    missing = client.post(route, json={"model": model.path.name, field: ["a"]})
    assert missing.status_code == 422
    assert missing.text.count("Field 'query' is required: the query string") == 1


@pytest.mark.parametrize(("document", "code", "param", "message"), [
    ({"txt": "a"}, "missing_field", "documents[1].text",
     "documents[1] is an object with no 'text'; a document object needs 'text': a string"),
    ({"text": 3}, "invalid_type", "documents[1].text",
     "documents[1] is an object with 'text' of type number; a document object needs 'text': a string"),
    ({"text": None}, "invalid_type", "documents[1].text",
     "documents[1] is an object with 'text' of type null; a document object needs 'text': a string"),
    (3, "invalid_type", "documents[1]", 'documents[1] must be a string or an object {"text": string}, found number'),
    ([1, 2], "invalid_type", "documents[1]",
     'documents[1] must be a string or an object {"text": string}, found array'),
    ({"text": ""}, "empty_input", "documents[1]", "documents[1] is an empty string"),
])
def test_v1_rerank_document_objects_are_checked_by_their_text(served, document, code, param, message):
    """Cohere's {"text": ...} document objects: one without a string text was answered "documents[1] must be a
    string, found object", which hid that objects are taken and what was wrong with this one."""
    model, client = served
    response = client.post("/v1/rerank", json={"model": model.path.name, "query": "q", "documents": ["a", document]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"].startswith(message), error["message"]


@pytest.mark.parametrize("route", ["/rerank", "/predict"])
def test_a_huge_truncation_direction_is_not_echoed_back(served, route):
    """A 2 MB truncation_direction came back whole in the 422 (any client could make the server write what it
    sent); the message shows its start."""
    _, client = served
    body = {"query": "q", "texts": ["a"]} if route == "/rerank" else {"inputs": ["q", "a"]}
    response = client.post(route, json={**body, "truncation_direction": "L" * 2_000_000})
    assert response.status_code == 422, response.text
    assert len(response.content) < 500
    assert response.json()["error"].startswith("Only truncation_direction 'Right' is supported (as the model was "
                                               "trained), found 'LLLL")


class NonFinite:
    """A reranker whose scores are NaN for a passage holding "nan"."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def predict(self, pairs, **options):
        scores = np.asarray(self._model.predict(pairs, **options), dtype=np.float32)
        return np.where([["nan" in b] for _, b in pairs] if scores.ndim == 2 else [("nan" in b) for _, b in pairs],
                        np.nan, scores)


def test_a_reranker_that_scores_nan_says_scores_not_embeddings(reranker):
    model = CrossEncoderModel(reranker["adapter_export"])
    with TestClient(create_app(NonFinite(model), ServeSettings())) as client:
        for route, body in [("/rerank", {"query": "q", "texts": ["a", "nan"]}), ("/predict", {"inputs": ["q", "nan"]})]:
            response = client.post(route, json=body)
            assert response.status_code == 500, response.text
            assert response.json() == {"error": f"Model {model.path.name!r} produced NaN or Inf for this batch "
                                                "(corrupt weights?); no scores were returned", "error_type": "Backend"}
        assert client.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 200


class CountingTokenizer:
    """A tokenizers.Tokenizer that adds up the characters of the texts it is given to encode."""

    def __init__(self, tokenizer, seen: dict):
        self._tokenizer, self._seen = tokenizer, seen

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def _count(self, item) -> None:
        self._seen["chars"] += len(item) if isinstance(item, str) else sum(map(len, item))

    def encode(self, item, *args, **kwargs):
        self._count(item)
        return self._tokenizer.encode(item, *args, **kwargs)

    def encode_batch(self, items, *args, **kwargs):
        for item in items:
            self._count(item)
        return self._tokenizer.encode_batch(items, *args, **kwargs)


def test_a_long_query_is_tokenized_once_for_all_its_passages(reranker):
    """A 20,000-character query without word boundaries (kept whole: no prefix decides its tokens) with 200
    passages: the model call tokenized it once per passage (10 million characters here, every other request
    waiting). Now once per model call; the scores equal scoring each pair alone."""
    model = CrossEncoderModel(reranker["adapter_export"])
    query = "a" * 20_000
    passages = [f"passage {i} " + "about resetting passwords " * (i % 7) for i in range(200)]
    alone = np.array([model.predict([(query, p)])[0] for p in passages[:20]])
    tokenizer = model._tokenizer
    seen = {"chars": 0}
    counter = tokenizer._counter()  # its untruncated copy also tokenizes each text of the pairs
    counter._tokenizer = CountingTokenizer(counter._tokenizer, seen)
    tokenizer.tokenizer = CountingTokenizer(tokenizer.tokenizer, seen)
    with TestClient(create_app(model, ServeSettings(warmup=False))) as client:
        response = client.post("/rerank", json={"query": query, "texts": passages, "truncate": True})
    assert response.status_code == 200, response.text
    passage_chars = sum(map(len, passages))
    # the query: its prefix search (about 2x its length) and one encoding per model call; the passages a few times
    assert seen["chars"] < 4 * len(query) + 4 * passage_chars, seen
    scores = {r["index"]: r["score"] for r in response.json()}
    np.testing.assert_allclose([scores[i] for i in range(20)], alone, atol=1e-5)


def test_pairs_that_share_a_query_are_tokenized_as_each_pair_alone(reranker):
    """The shared-query path (each distinct query tokenized once, pairs assembled by the tokenizer's
    post-processing) gives exactly the ids and type ids of encoding every pair whole: long and short sides,
    truncation of either side or both, a prompt before the query, texts the tokenizer splits oddly."""
    model = CrossEncoderModel(reranker["adapter_export"])
    tokenizer = model._tokenizer
    queries = ["How do I reset my password?", LONG, "a" * 3000, "naïve café — 中文 😀", "q"]
    passages = [*DOCUMENTS, LONG, "b" * 2000, "x " * 700, "Hi"]
    pairs = [(q, p) for q in queries for p in passages]
    for prompt in (None, "", "Find the passage that answers: "):
        got = tokenizer.tokenize_pairs(pairs, prompt)
        prefix = tokenizer.pair_prompts.query_prefix(prompt)
        def prepared(text):  # as the pair path prepares each side before tokenizing
            text = tokenizer.truncation_prefixes([text])[0]
            return text.lower() if tokenizer.do_lower_case else text

        want = tokenizer.tokenizer.encode_batch([(prepared(prefix + q), prepared(p)) for q, p in pairs])
        assert [e.ids for e in got] == [e.ids for e in want]
        assert [e.type_ids for e in got] == [e.type_ids for e in want]
        assert max(len(e.ids) for e in got) == model.max_seq_length


def _metric(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_metrics_count_reranker_pairs_tokens_and_failures_by_reason(served):
    """/metrics counts a reranker's pairs and tokens per model, and its refusals by reason; the help texts said
    "Texts embedded" and "embedding routes" of a reranker's figures."""
    model, client = served
    name = model.path.name
    before = client.get("/metrics").text
    ranked = client.post("/v1/rerank", json={"model": name, "query": QUERY, "documents": DOCUMENTS[:3]})
    assert ranked.status_code == 200, ranked.text
    assert client.post("/rerank", json={"query": LONG, "texts": ["a"]}).status_code == 422
    after = client.get("/metrics").text
    for metric, grew in ((f'peft_export_inputs_total{{model="{name}"}}', 3),
                         (f'peft_export_tokens_total{{model="{name}"}}', ranked.json()["usage"]["total_tokens"]),
                         (f'peft_export_request_failures_total{{model="{name}",reason="too_many_tokens",'
                          'route="/rerank"}', 1)):
        assert _metric(after, metric) - _metric(before, metric) == grew, metric
    assert "# HELP peft_export_inputs_total Inputs answered: texts embedded, or (query, text) pairs scored" in after
    assert "embedding routes" not in after and "Embedding requests" not in after
