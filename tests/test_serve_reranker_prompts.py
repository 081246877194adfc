"""Reranker prompts over HTTP: ``/rerank``, ``/v1/rerank`` and ``/predict`` take ``prompt_name`` (one of the model's
prompts) or ``prompt`` (a literal text, "" for none), as ``CrossEncoder.predict`` does, and answer what
``CrossEncoderModel.predict`` gives in process with the same prompt; tokens are counted with the prompt; requests
with different prompts never share a batch call's prompt; bad prompt fields are 422s naming the field."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from fixtures.export_edits import with_task_config  # noqa: E402
from peft_export import CrossEncoderModel  # noqa: E402
from peft_export.serve.app import create_app  # noqa: E402
from peft_export.serve.settings import ServeSettings  # noqa: E402

PROMPTS = {"web": "Find the passage that answers: ", "code": "Which snippet of source code solves this? "}
LITERAL = "Rank passages about account security for: "
QUERY = "How do I reset my password?"
DOCUMENTS = ["Open the settings page, choose Security and click 'Reset password'.",
             "Paris is the capital and most populous city of France.", "Hi", "A password manager keeps them safe."]


@pytest.fixture(scope="module")
def served(reranker, tmp_path_factory):
    """The tiny BERT reranker's export with two prompts ("web" the default), served alone; each batch call's
    options are recorded."""
    folder = with_task_config(reranker["adapter_export"], tmp_path_factory.mktemp("prompts") / "rr", prompts=PROMPTS,
                              default_prompt_name="web", query_prompt=PROMPTS["web"])
    model = CrossEncoderModel(folder)
    reference = CrossEncoderModel(folder)
    calls = []
    predict = model.predict

    def recording(pairs, **options):
        calls.append((options.get("prompt"), [a for a, _ in pairs]))
        return predict(pairs, **options)

    model.predict = recording
    settings = ServeSettings(max_batch_delay_ms=50, max_input_chars=20_000)
    with TestClient(create_app({"rr": model}, settings)) as client:
        yield reference, client, calls


def _scores(reference, **prompt):
    return reference.predict([(QUERY, d) for d in DOCUMENTS], **prompt)


def _post(client, route, **fields):
    body = {"/rerank": {"query": QUERY, "texts": DOCUMENTS},
            "/v1/rerank": {"model": "rr", "query": QUERY, "documents": DOCUMENTS},
            "/predict": {"inputs": [[QUERY, d] for d in DOCUMENTS], "raw_scores": True}}[route]
    return client.post(route, json={**body, **fields})


def _by_index(route, payload) -> np.ndarray:
    if route == "/predict":
        return np.array([answer[0]["score"] for answer in payload])
    results = payload if route == "/rerank" else payload["results"]
    key = "score" if route == "/rerank" else "relevance_score"
    return np.array([r[key] for r in sorted(results, key=lambda r: r["index"])])


@pytest.mark.parametrize("route", ["/rerank", "/v1/rerank", "/predict"])
@pytest.mark.parametrize("fields", [{}, {"prompt_name": "code"}, {"prompt_name": "web"}, {"prompt": LITERAL},
                                    {"prompt": ""}])
def test_each_route_applies_the_prompt_as_predict_does(served, route, fields):
    reference, client, _ = served
    response = _post(client, route, **fields)
    assert response.status_code == 200, response.text
    activation = {"activation_fn": "identity"} if route == "/predict" else {}
    want = reference.predict([(QUERY, d) for d in DOCUMENTS], **fields, **activation)
    np.testing.assert_allclose(_by_index(route, response.json()), want, atol=1e-6)


def test_the_prompts_change_the_scores(served):
    """The parity above could not tell prompts apart if they scored alike: they do not. Compared on the logits
    (/predict's raw scores): the tiny model's sigmoid scores sit near 0.9999, where prompts moved them by 5e-5 in
    some builds of it, under the 1e-4 this asserted."""
    reference, client, _ = served
    default = _by_index("/predict", _post(client, "/predict").json())
    for fields in ({"prompt_name": "code"}, {"prompt": LITERAL}, {"prompt": ""}):
        got = _by_index("/predict", _post(client, "/predict", **fields).json())
        assert np.abs(got - default).max() > 1e-3, (fields, np.abs(got - default).max())
    np.testing.assert_allclose(default, _scores(reference, prompt_name="web", activation_fn="identity"), atol=1e-5)


@pytest.mark.parametrize(("fields", "status", "code", "param", "message"), [
    ({"prompt_name": "legal"}, 422, "unknown_prompt", "prompt_name",
     "Prompt name 'legal' not found: the model's prompts are ['web', 'code']"),
    ({"prompt_name": "web", "prompt": "x"}, 422, "prompt_conflict", "prompt",
     "Send either 'prompt_name' or 'prompt', not both"),
    ({"prompt_name": 3}, 422, "invalid_type", "prompt_name", "Field 'prompt_name' must be a string, found number"),
    ({"prompt": ["a"]}, 422, "invalid_type", "prompt", "Field 'prompt' must be a string, found array"),
    ({"prompt": "x" * 20_001}, 422, "input_too_long", "prompt", "Field 'prompt' has 20001 characters; the limit"),
])
def test_bad_prompt_fields_are_422_naming_the_field(served, fields, status, code, param, message):
    _, client, calls = served
    calls.clear()
    response = _post(client, "/v1/rerank", **fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"].startswith(message), error["message"]
    assert calls == []  # refused before any pair was queued
    tei = _post(client, "/rerank", **fields)
    assert tei.status_code == status and tei.json()["error"].startswith(message)


@pytest.mark.parametrize("route", ["/rerank", "/v1/rerank", "/predict"])
def test_a_prompt_that_is_not_valid_unicode_is_refused(served, route):
    """A lone surrogate in the prompt never reaches the tokenizer: the body is refused as it is for any field."""
    _, client, _ = served
    body = {"/rerank": '{"query": "q", "texts": ["a"]', "/predict": '{"inputs": ["q", "a"]',
            "/v1/rerank": '{"model": "rr", "query": "q", "documents": ["a"]'}[route] + ', "prompt": "Find \\ud800 x"}'
    response = client.post(route, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    text = message["message"] if isinstance(message, dict) else message
    assert text.startswith("Request body is not valid JSON: no low surrogate in string"), text


def test_tokens_are_counted_with_the_prompt(served):
    """A pair that fits the model without a prompt but not with a long one: 422 unless truncate, and truncation
    then scores what predict scores."""
    from tokenizers import Tokenizer

    reference, client, _ = served
    limit = reference.max_seq_length
    counter = Tokenizer.from_str(reference.tokenizer.to_str())
    counter.no_truncation()

    word = next(w for w in ("a", "the", "is", "x", "1") if len(counter.encode(w, add_special_tokens=False).ids) == 1)

    def pair_tokens(words: int) -> int:  # with the default prompt before the query
        return len(counter.encode(PROMPTS["web"] + QUERY, " ".join([word] * words)).ids)

    words = next(n for n in range(1, limit) if pair_tokens(n + 1) > limit)
    assert pair_tokens(words) == limit
    document = " ".join([word] * words)  # the longest that fits with the default prompt
    body = {"model": "rr", "query": QUERY, "documents": [document], "truncate": False}
    assert client.post("/v1/rerank", json=body).status_code == 200
    prompt = "Please rank this carefully: " * 3
    assert reference.prompt_token_overhead(prompt) > reference.pair_token_overhead
    over = client.post("/v1/rerank", json={**body, "prompt": prompt})
    assert over.status_code == 422, over.text
    assert over.json()["error"]["code"] == "too_many_tokens"
    cut = client.post("/v1/rerank", json={**body, "prompt": prompt, "truncate": True})
    assert cut.status_code == 200, cut.text
    np.testing.assert_allclose(cut.json()["results"][0]["relevance_score"],
                               reference.predict([(QUERY, document)], prompt=prompt), atol=1e-6)


def test_concurrent_requests_with_different_prompts_are_batched_apart(served):
    """Requests with four prompts at once: each answer equals its request alone, and every batch call holds the
    pairs of one prompt only."""
    reference, client, calls = served
    prompts = [{}, {"prompt_name": "code"}, {"prompt": LITERAL}, {"prompt": ""}]
    queries = {i: f"query {i} about passwords" for i in range(len(prompts))}
    calls.clear()

    def ask(i):
        body = {"model": "rr", "query": queries[i], "documents": DOCUMENTS, **prompts[i]}
        return i, client.post("/v1/rerank", json=body)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, [i for i in range(len(prompts)) for _ in range(3)]))
    for i, response in answers:
        assert response.status_code == 200, response.text
        want = reference.predict([(queries[i], d) for d in DOCUMENTS], **prompts[i])
        np.testing.assert_allclose(_by_index("/v1/rerank", response.json()), want, atol=1e-6)
    resolved = {i: None if not p else p.get("prompt", PROMPTS.get(p.get("prompt_name"))) for i, p in
                enumerate(prompts)}
    for prompt, firsts in calls:
        owners = {i for i in queries if queries[i] in firsts}
        assert len(owners) >= 1 and all(resolved[i] == prompt for i in owners), (prompt, owners)


def test_a_huge_prompt_name_is_not_echoed_back(served):
    """A 2 MB prompt_name came back whole in the 422 (the runtime's message quoted it in full)."""
    _, client, calls = served
    calls.clear()
    for route in ("/rerank", "/v1/rerank", "/predict"):
        response = _post(client, route, prompt_name="n" * 2_000_000)
        assert response.status_code == 422, response.text
        assert len(response.content) < 500
        error = response.json()["error"]
        message = error["message"] if route == "/v1/rerank" else error
        assert message.startswith("Prompt name 'nnnn") and "not found: the model's prompts are ['web', 'code']" in \
            message, message
    assert calls == []


def test_a_prompt_the_export_cannot_apply_is_refused_without_the_servers_path(reranker, tmp_path):
    """A chat-template export made before prompts were recorded applies its default prompt only; the 422 said so
    beginning with the export's folder on the server's disk. It names the served model instead."""
    template = {"prefix": "Query: ", "middle": " Passage: ", "suffix": "", "suffix_ids": []}
    folder = with_task_config(reranker["adapter_export"], tmp_path / "old-template", drop=("prompts",),
                              pair_template=template)
    with TestClient(create_app({"old": CrossEncoderModel(folder)}, ServeSettings())) as client:
        response = client.post("/v1/rerank", json={"model": "old", "query": QUERY, "documents": DOCUMENTS,
                                                   "prompt": LITERAL})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("invalid_prompt", "prompt")
        assert error["message"].startswith(f"Model 'old' cannot apply the prompt {LITERAL!r}: it applies only its "
                                           "default prompt, because it was made before peft_export recorded prompts")
        assert str(tmp_path) not in response.text
        assert client.post("/v1/rerank", json={"model": "old", "query": QUERY, "documents": DOCUMENTS}
                           ).status_code == 200
