"""TEI's ``POST /predict`` on reranker exports (sequence classification with one label or several): every label's
score of each pair, softmax (several labels) or sigmoid (one) unless raw_scores, equal to ``CrossEncoderModel.
predict`` in process; /rerank and /v1/rerank refuse a model with several labels and name /predict."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from peft_export import CrossEncoderModel  # noqa: E402
from peft_export.errors import ConfigError  # noqa: E402
from peft_export.serve.app import create_app  # noqa: E402
from peft_export.serve.settings import ServeSettings  # noqa: E402

PAIRS = [
    ("A man is sleeping on a sofa.", "A person rests."),
    ("How do I reset my password?", "Open the settings page, choose Security and click 'Reset password'."),
    ("Paris is in France.", "Paris is the capital and most populous city of France, on the Seine."),
    ("Hi", "Hello"),
]
LONG = " ".join(["A passage far longer than the model's maximum sequence length."] * 40)
LIMIT = 6


@pytest.fixture(scope="module")
def exports(zoo, reranker):
    import reranker_fixtures

    return {"rr": reranker_fixtures.switchable_reranker(zoo, reranker),
            "nli": reranker_fixtures.nli_reranker(zoo)["export"]}


@pytest.fixture(scope="module")
def group(exports):
    """One server with the one-label switchable reranker ("rr": adapters qv, qk) and the three-label one ("nli":
    adapters nli-qv, nli-qk), each with its own batcher; every batch call is recorded with its options."""
    models = {name: CrossEncoderModel(path) for name, path in exports.items()}
    calls = []
    for name, model in models.items():
        predict = model.predict

        def recording(pairs, _name=name, _predict=predict, **options):
            calls.append((_name, options.get("adapter"), [b for _, b in pairs]))
            return _predict(pairs, **options)

        model.predict = recording
    settings = ServeSettings(max_inputs_per_request=LIMIT, max_batch_delay_ms=50)
    with TestClient(create_app(models, settings)) as client:
        yield models, client, calls


def _want(model, pairs, adapter, raw=False):
    """What /predict should give, in process: TEI's softmax over several labels, the sigmoid of one, or the
    logits; per pair {label: score}."""
    if raw:
        rows = model.predict(pairs, adapter=adapter, activation_fn="identity")
    elif model.num_labels > 1:
        rows = model.predict(pairs, adapter=adapter, apply_softmax=True)
    else:
        rows = model.predict(pairs, adapter=adapter, activation_fn="sigmoid")
    rows = np.asarray(rows).reshape(len(pairs), -1)
    return [{model.id2label[j]: float(row[j]) for j in range(len(row))} for row in rows]


def _check(got, want):
    """``got`` (one pair's /predict answer) is sorted best first and equals ``want`` label by label (1e-6)."""
    scores = [p["score"] for p in got]
    assert scores == sorted(scores, reverse=True), got
    assert sorted(p["label"] for p in got) == sorted(want)
    np.testing.assert_allclose([p["score"] for p in got], [want[p["label"]] for p in got], atol=1e-6)


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize(("export", "name"), [("nli", None), ("nli", "nli-qv"), ("nli", "nli-qk"),
                                              ("rr", None), ("rr", "qv"), ("rr", "qk")])
def test_predict_equals_predict_in_process(group, export, name, raw):
    models, client, _ = group
    model = models[export]
    response = client.post("/predict", json={"model": name or export, "inputs": [list(p) for p in PAIRS],
                                             "raw_scores": raw})
    assert response.status_code == 200, response.text
    got = response.json()
    want = _want(model, PAIRS, name or False, raw)
    assert len(got) == len(PAIRS)
    for answer, expected in zip(got, want):
        _check(answer, expected)
    labels = {p["label"] for p in got[0]}
    assert labels == ({"contradiction", "entailment", "neutral"} if export == "nli" else {"LABEL_0"})
    if export == "nli" and not raw:
        np.testing.assert_allclose([sum(p["score"] for p in answer) for answer in got], 1.0, atol=1e-6)


def test_one_pair_gets_one_list_and_the_adapters_differ(group):
    models, client, _ = group
    answers = {}
    for name in ("nli-qv", "nli-qk"):
        response = client.post("/predict", json={"model": name, "inputs": list(PAIRS[0])})
        assert response.status_code == 200, response.text
        answers[name] = {p["label"]: p["score"] for p in response.json()}  # a list of {score, label}
        _check(response.json(), _want(models["nli"], PAIRS[:1], name)[0])
    assert max(abs(answers["nli-qv"][k] - answers["nli-qk"][k]) for k in answers["nli-qv"]) > 1e-3


def test_without_model_the_first_reranker_export_answers(group):
    models, client, _ = group
    response = client.post("/predict", json={"inputs": [list(PAIRS[1])]})
    assert response.status_code == 200, response.text
    _check(response.json()[0], _want(models["rr"], PAIRS[1:2], False)[0])


@pytest.mark.parametrize(("route", "body"), [
    ("/rerank", {"model": "nli", "query": "q", "texts": ["a", "b"]}),
    ("/rerank", {"model": "nli-qk", "query": "q", "texts": ["a", "b"]}),
    ("/v1/rerank", {"model": "nli-qv", "query": "q", "documents": ["a", "b"]}),
])
def test_rerank_routes_refuse_several_labels_and_name_predict(group, route, body):
    _, client, _ = group
    response = client.post(route, json=body)
    assert response.status_code == 400, response.text
    payload = response.json()
    message = payload["error"]["message"] if route == "/v1/rerank" else payload["error"]
    assert message == (f"Model {body['model']!r} has 3 labels (contradiction, entailment, neutral); /rerank and "
                       "/v1/rerank rank by one score per pair. Send its pairs to POST /predict, which returns every "
                       "label's score")
    if route == "/rerank":
        assert payload["error_type"] == "Validation"
    else:
        assert payload["error"]["code"] == "several_labels"
    # the one-label export in the same server still ranks
    ok = client.post(route, json={**body, "model": "qv"})
    assert ok.status_code == 200, ok.text


def test_a_three_label_export_alone_is_served(exports):
    """It was refused at start-up ("Serving reranks with one score per pair") before /predict existed."""
    model = CrossEncoderModel(exports["nli"])
    with TestClient(create_app(model)) as client:
        response = client.post("/predict", json={"inputs": [list(p) for p in PAIRS]})
        assert response.status_code == 200, response.text
        for answer, want in zip(response.json(), _want(model, PAIRS, False)):
            _check(answer, want)
        assert client.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 400
        metrics = client.get("/metrics").text
    assert 'route="/predict"' in metrics and 'route="/rerank"' in metrics


@pytest.mark.parametrize(("body", "message"), [
    ({}, "Field 'inputs' is required: a pair [text, text] or a list of pairs"),
    ({"inputs": "one text"}, "Field 'inputs' is one text; this model scores pairs of texts"),
    ({"inputs": ["one text"]}, "Field 'inputs' is one text; this model scores pairs of texts"),
    ({"inputs": []}, "Field 'inputs' is an empty list"),
    ({"inputs": {"a": "b"}}, "Field 'inputs' must be a pair [text, text] or a list of pairs"),
    ({"inputs": ["a", "b", "c"]}, "inputs must be a pair [text, text], found a list of 3"),
    ({"inputs": [["a", "b"], ["c"]]}, "inputs[1] must be a pair [text, text], found a list of 1"),
    ({"inputs": [["a", "b"], "c"]}, "inputs[1] must be a pair [text, text], found string"),
    ({"inputs": [["a", "b"], ["c", 3]]}, "inputs[1][1] must be a string, found number"),
    ({"inputs": ["a", ""]}, "inputs[1] is an empty string"),
    ({"inputs": [["a", "b"]] * (LIMIT + 1)}, f"Field 'inputs' has {LIMIT + 1} inputs; the limit is {LIMIT} per"),
    ({"inputs": ["a", "b"], "raw_scores": "yes"}, "Field 'raw_scores' must be true or false"),
    ({"inputs": ["a", "b"], "truncation_direction": "Left"}, "Only truncation_direction 'Right' is supported"),
    ({"inputs": ["q", LONG]}, "the texts of inputs[0] have more than 64 tokens; the model takes at most 64"),
    ({"inputs": [["q", "a"], [LONG, "q"]]}, "the texts of inputs[1] have more than 64 tokens"),
])
def test_bad_predict_requests_get_422_naming_the_field(group, body, message):
    _, client, _ = group
    response = client.post("/predict", json={"model": "nli", **body})
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith(message), response.json()
    assert response.json()["error_type"] == "Validation"


def test_unknown_model_is_404_and_limits_are_exact(group):
    models, client, _ = group
    missing = client.post("/predict", json={"model": "../nli-qv", "inputs": ["a", "b"]})
    assert missing.status_code == 404 and missing.json()["error"].startswith("Model '../nli-qv' is not served")
    full = client.post("/predict", json={"model": "nli", "inputs": [["a", "b"]] * LIMIT})
    assert full.status_code == 200 and len(full.json()) == LIMIT
    truncated = client.post("/predict", json={"model": "nli-qk", "inputs": [["q", LONG], ["q", "short"]],
                                              "truncate": True})
    assert truncated.status_code == 200, truncated.text
    for answer, want in zip(truncated.json(), _want(models["nli"], [("q", LONG), ("q", "short")], "nli-qk")):
        _check(answer, want)


def test_concurrent_predicts_batch_by_export_and_adapter(group):
    """Mixed /predict and /rerank traffic for four adapters of two exports: every answer equals its request alone,
    and each batch call holds one export's, one adapter's pairs."""
    from concurrent.futures import ThreadPoolExecutor

    models, client, calls = group
    names = {"qv": "rr", "qk": "rr", "nli-qv": "nli", "nli-qk": "nli"}
    pairs = {name: [(f"{name} query {i}", f"{name} passage {i} about a sleeping man") for i in range(5)]
             for name in names}
    calls.clear()

    def ask(name):
        body = {"model": name, "inputs": [list(p) for p in pairs[name]]}
        return name, client.post("/predict", json=body)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, list(names) * 3))
    for name, response in answers:
        assert response.status_code == 200, response.text
        for answer, want in zip(response.json(), _want(models[names[name]], pairs[name], name)):
            _check(answer, want)
    served = [(export, adapter, passages) for export, adapter, passages in calls if adapter in names]
    assert served
    for export, adapter, passages in served:
        assert names[adapter] == export and all(p.startswith(f"{adapter} passage") for p in passages)
    metrics = client.get("/metrics").text
    assert 'route="/predict"' in metrics and 'model="nli-qk"' in metrics


def test_an_older_export_without_labels_answers_label_i(exports, tmp_path):
    """Exports made before id2label was recorded: LABEL_0.. as transformers names them; a malformed id2label is
    refused at load."""
    from fixtures.export_edits import rehash

    folder = shutil.copytree(exports["nli"], tmp_path / "old")
    path = folder / "reranker_config.json"
    config = json.loads(path.read_text())
    assert config["task_config"]["id2label"] == {"0": "contradiction", "1": "entailment", "2": "neutral"}
    del config["task_config"]["id2label"]
    path.write_text(json.dumps(config))
    rehash(folder, "reranker_config.json")
    model = CrossEncoderModel(folder)
    assert model.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    with TestClient(create_app(model)) as client:
        response = client.post("/predict", json={"inputs": list(PAIRS[0])})
    assert response.status_code == 200 and {p["label"] for p in response.json()} == {"LABEL_0", "LABEL_1", "LABEL_2"}

    config["task_config"]["id2label"] = {"0": "a", "1": "b"}
    path.write_text(json.dumps(config))
    rehash(folder, "reranker_config.json")
    with pytest.raises(ConfigError, match=r"task_config.id2label must name each of the 3 labels by its index"):
        CrossEncoderModel(folder)


def test_the_export_records_every_label_name_with_transformers_defaults_for_missing_ones():
    from peft_export.export.reranker_module import label_names

    assert label_names({0: "contradiction", 1: "entailment", 2: "neutral"}, 3) == {
        "0": "contradiction", "1": "entailment", "2": "neutral"}
    assert label_names({"0": "yes"}, 2) == {"0": "yes", "1": "LABEL_1"}
    assert label_names(None, 1) == {"0": "LABEL_0"}
