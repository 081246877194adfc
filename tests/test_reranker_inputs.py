"""CrossEncoderModel.predict()/rank() on awkward input, from outside (RELIABILITY items 16-19, 24 and 51 applied to
rerankers): shapes and options as sentence-transformers' CrossEncoder gives them, every refusal naming the argument
and the value, awkward strings scored as eager sentence-transformers scores them, the same pair scoring the same
wherever it is batched, one huge passage costing its truncation prefix, adapters per call never mixed across
threads, and prompts longer than max_length truncated as eager truncates them."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import reranker_fixtures
from fixtures import tiny_models
from peft_export import AdapterNotFoundError, ConfigError, CrossEncoderModel, InvalidInputError

TOLERANCE = 1e-5
QUERY = "How do I reset my password?"
PASSAGES = ["Open the settings page and click 'Reset password'.", "Paris is the capital of France.", "Hi",
            "A link to reset it is sent to your e-mail address within a minute.", "Reset"]
PAIRS = [(QUERY, p) for p in PASSAGES]
AWKWARD = [("", ""), ("   ", "\t\n"), ("a\x00b", "\x00"), ("😀🎉 emoji", "🙂"), ("مرحبا بالعالم", "שלום עולם"),
           ("e\u0301\u0308 combining", "n\u0303"), (QUERY, "x" * 3000)]


@pytest.fixture(scope="module")
def model(reranker) -> CrossEncoderModel:
    return CrossEncoderModel(reranker["adapter_export"])


@pytest.fixture(scope="module")
def eager(reranker):
    return tiny_models.cross_encoder_reference(reranker["base"], reranker["adapter"])


@pytest.fixture(scope="module")
def switchable(zoo, reranker) -> CrossEncoderModel:
    return CrossEncoderModel(reranker_fixtures.switchable_reranker(zoo, reranker))


def _logits(model, pairs, **kwargs) -> np.ndarray:
    return model.predict(pairs, activation_fn="identity", **kwargs)


# ----- shapes and options (item 16) -----
def test_pairs_as_numpy_rows_score_as_the_list(model):
    # sentence-transformers takes an array of [query, passage] rows; it was refused ("inputs[0] must be a pair").
    rows = np.array([list(p) for p in PAIRS])
    assert np.array_equal(model.predict(rows), model.predict(PAIRS))
    assert np.ndim(model.predict(rows[0])) == 0 and model.predict(rows[0]) == model.predict(PAIRS[0])
    assert model.predict(list(PAIRS[0])) == model.predict(PAIRS[0])  # one pair as a list is one pair


@pytest.mark.parametrize("inputs, message", [
    (None, r"inputs must be a \(query, passage\) pair or a list of them, found NoneType None"),
    ("query and passage", r"inputs must be a \(query, passage\) pair or a list of them, found str 'query and"),
    (5, r"inputs must be a \(query, passage\) pair or a list of them, found int 5"),
    (("q", "p", "x"), r"inputs is one pair of 3 strings, found \('q', 'p', 'x'\): a pair is \(query, passage\)"),
    ([("q", "p"), ("q", None)], r"inputs\[1\] must be a \(query, passage\) pair of two strings, found \('q', None\)"),
    ([("q", "p"), ("q", "p", "x")], r"inputs\[1\] must be a \(query, passage\) pair of two strings"),
    ([("q", "p"), (1, 2)], r"inputs\[1\] must be a \(query, passage\) pair of two strings, found \(1, 2\)"),
], ids=["none", "one-string", "int", "three-strings", "none-item", "triple", "ints"])
def test_inputs_that_are_not_pairs_are_refused_naming_them(model, inputs, message):
    # None was "TypeError: 'NoneType' object is not iterable"; a string or three strings were "inputs[0] must be a
    # pair ..., found 'q'", naming their first character.
    with pytest.raises(InvalidInputError, match=message):
        model.predict(inputs)


@pytest.mark.parametrize("pairs, named", [
    ([("a", "b"), ("c", "\ud800")], r"inputs\[1\]\[1\] \(the passage of pair 1\)"),
    ([("a", "b"), ("\ud800", "d")], r"inputs\[1\]\[0\] \(the query of pair 1\)"),
], ids=["passage", "query"])
def test_invalid_unicode_is_named_by_its_pair_and_side(model, pairs, named):
    # Named "sentences[3]" before: an index into the call's queries followed by its passages.
    with pytest.raises(InvalidInputError, match=named + r" is not valid Unicode: '\\ud800' at character 0"):
        model.predict(pairs)
    with pytest.raises(InvalidInputError, match=r"^prompt is not valid Unicode"):
        model.predict(PAIRS, prompt="\ud800")
    with pytest.raises(InvalidInputError, match=r"inputs\[2\]\[1\] \(the passage of pair 2\)"):
        model.rank(QUERY, ["a", "b", "\ud800"])


def test_activation_fn_takes_names_and_functions_of_the_logits_shape(model, eager):
    logits = _logits(model, PAIRS)
    assert np.allclose(model.predict(PAIRS, activation_fn=np.tanh), np.tanh(logits), atol=1e-6)
    assert np.array_equal(model.predict(PAIRS, activation_fn=lambda x: x[:, 0]), logits)  # one label: per pair
    assert np.array_equal(model.predict(PAIRS, apply_softmax=True), model.predict(PAIRS))  # one label: no softmax
    listed = model.predict(PAIRS, convert_to_numpy=False)
    assert isinstance(listed, list) and np.array_equal(np.array(listed), model.predict(PAIRS))
    with pytest.raises(ValueError, match=r"activation_fn must be a function or one of sigmoid, identity, tanh, found "
                                         r"int 5"):
        model.predict(PAIRS, activation_fn=5)  # was "TypeError: 'int' object is not callable"
    for reduction, shape in ((np.sum, r"\(\)"), (lambda x: x[:2], r"\(2, 1\)")):
        with pytest.raises(ValueError, match=r"activation_fn must return one row per pair, as the logits \(5, 1\) "
                                             rf"have, returned shape {shape}"):
            model.predict(PAIRS, activation_fn=reduction)  # was returned as if it were the scores


def test_several_labels_give_a_row_per_pair(zoo):
    """A three-label (NLI) CrossEncoder: a row of logits per pair, one pair a row, no pairs (0, 3), an activation
    that picks one label a value per pair (as sentence-transformers returns it), rank() refused."""
    model = CrossEncoderModel(reranker_fixtures.nli_reranker(zoo)["export"])
    logits = model.predict(PAIRS)
    assert logits.shape == (5, 3) and model.predict(PAIRS[0]).shape == (3,) and model.predict([]).shape == (0, 3)
    assert np.array_equal(model.predict(PAIRS, activation_fn=lambda x: x[:, 1]), logits[:, 1])
    np.testing.assert_allclose(model.predict(PAIRS[0], apply_softmax=True).sum(), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match=r"rank\(\) needs a model with num_labels=1; .* has 3"):
        model.rank(QUERY, PASSAGES)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_batch_size_must_be_a_positive_integer(model, batch_size):
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, found {batch_size!r}"):
        model.predict(PAIRS, batch_size=batch_size)


def test_rank_top_k_and_documents(model, eager):
    assert model.rank(QUERY, PASSAGES, top_k=0) == [] and model.rank(QUERY, []) == []
    everything = model.rank(QUERY, PASSAGES, return_documents=True)
    assert model.rank(QUERY, PASSAGES, top_k=99, return_documents=True) == everything
    assert [r["corpus_id"] for r in everything] == [r["corpus_id"] for r in eager.rank(QUERY, PASSAGES)]
    assert all(r["text"] == PASSAGES[r["corpus_id"]] for r in everything)
    for top_k in (-1, 1.5, True, "3"):
        # -1 silently dropped the last document (a slice); 1.5 was a TypeError from slicing.
        with pytest.raises(ValueError, match=rf"top_k must be None \(all documents\) or a non-negative integer, "
                                             rf"found {top_k!r}"):
            model.rank(QUERY, PASSAGES, top_k=top_k)
    with pytest.raises(InvalidInputError, match=r"documents must be a list of strings, found str 'abc'"):
        model.rank(QUERY, "abc")  # was each character ranked as a document
    with pytest.raises(InvalidInputError, match=r"query must be a string, found NoneType"):
        model.rank(None, PASSAGES)


# ----- awkward strings and determinism (items 17, 19) -----
def test_awkward_strings_score_as_eager_cross_encoder(model, eager):
    import torch

    want = eager.predict(AWKWARD, activation_fn=torch.nn.Identity())
    for batch_size in (1, 32):
        assert np.abs(_logits(model, AWKWARD, batch_size=batch_size) - want).max() <= TOLERANCE


def test_the_same_pair_alone_among_longer_neighbours_and_after_many_calls(model, real_texts):
    alone = _logits(model, [PAIRS[0]])[0]
    neighbours = [(text, " ".join(real_texts[i:i + 6])) for i, text in enumerate(real_texts[:40])]
    for call in range(200):
        batch, at = neighbours[: call % 40], call % 40 // 2
        batch.insert(at, PAIRS[0])
        got = _logits(model, batch, batch_size=[1, 4, 32][call % 3])[at]
        assert abs(got - alone) <= TOLERANCE, call


def test_one_huge_passage_costs_its_truncation_prefix(model, monkeypatch):
    """Item 51: among 100 short pairs, a 100,000-character passage is tokenized as a prefix whose size does not grow
    with the passage (a 10,000,000-character one costs the same), and scores as the pair cut to what truncation keeps;
    the short pairs score as they do alone."""
    tokenizer = model._tokenizer
    real = tokenizer._untruncated()  # what tokenizes each text of the pairs (they are assembled from its encodings)
    tokenized: list[int] = []

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def encode_batch(self, items, **kwargs):
            tokenized.append(max(len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in items))
            return real.encode_batch(items, **kwargs)

    monkeypatch.setattr(tokenizer, "_untruncated", lambda: Counting())
    short = [(QUERY, f"short passage {i}") for i in range(100)]
    sizes = []
    for words in (20_000, 2_000_000):
        tokenized.clear()
        scores = _logits(model, [(QUERY, "word " * words)] + short)
        sizes.append(max(tokenized))
        assert abs(scores[0] - _logits(model, [(QUERY, "word " * 200)])[0]) <= TOLERANCE
        assert np.abs(scores[1:] - _logits(model, short, batch_size=1)).max() <= TOLERANCE
    assert sizes[0] == sizes[1] < 5_000


@pytest.mark.parametrize("layout", ["pair", "chat-template"])
def test_a_huge_query_ranked_with_a_prompt_is_not_copied_per_document(model, reranker, tmp_path, layout):
    """rank() pairs one query with every document: prompt + a 1,000,000-character query against 300 documents held
    300 copies of it (300 MB traced), as did a chat template's rendering; it costs what a bounded prefix costs per
    pair, and scores as the cut query does."""
    import tracemalloc

    from fixtures.export_edits import with_task_config

    if layout == "chat-template":  # a pair template rendering "prefix + query + middle + document + suffix"
        template = {"prefix": "Query: ", "middle": " Passage: ", "suffix": " end", "suffix_ids": [7, 8]}
        model = CrossEncoderModel(with_task_config(reranker["base_export"], tmp_path / "template",
                                                   pair_template=template, prompts={}))
    query, documents = "w " * 500_000, [f"document {i}" for i in range(300)]
    tracemalloc.start()
    try:
        ranked = model.rank(query, documents, prompt=None if layout == "chat-template" else "Find: ",
                            activation_fn="identity")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 30_000_000, peak
    cut = model.rank("w " * 200, documents, prompt=None if layout == "chat-template" else "Find: ",
                     activation_fn="identity")
    assert max(abs(a["score"] - b["score"]) for a, b in zip(sorted(ranked, key=lambda r: r["corpus_id"]),
                                                            sorted(cut, key=lambda r: r["corpus_id"]))) <= TOLERANCE


def test_a_long_query_through_a_chat_template_is_tokenized_once_for_all_its_documents(reranker, tmp_path,
                                                                                      monkeypatch):
    """A chat-template reranker renders prefix + query + middle + document + suffix per pair. A query whose rendered
    start decides the tokens truncation keeps gives one row with every document: it is tokenized once per call, not
    once per document (a 100,000-character query with 100 documents took 10 s on the Qwen3 tokenizer), and the rows
    are those of each pair rendered alone."""
    from fixtures.export_edits import with_task_config

    template = {"prefix": "Query: ", "middle": " Passage: ", "suffix": " end", "suffix_ids": [7, 8]}
    model = CrossEncoderModel(with_task_config(reranker["base_export"], tmp_path / "template", pair_template=template,
                                               prompts={}))
    documents = [f"document {i}" for i in range(100)] + ["word " * 5000]
    for query in ("w " * 50_000, "a, b! " * 20_000, "short query"):
        pairs = [(query, d) for d in documents]
        chars, rows = reranker_fixtures.characters_tokenized(model._tokenizer, pairs, monkeypatch)
        monkeypatch.setattr(model._tokenizer, "_decided_start", lambda start: None)  # each pair rendered alone
        per_pair_chars, per_pair = reranker_fixtures.characters_tokenized(model._tokenizer, pairs, monkeypatch)
        monkeypatch.undo()
        assert rows == per_pair
        if len(query) > 1000:
            assert chars * 20 < per_pair_chars, (chars, per_pair_chars)


def test_a_prompt_longer_than_max_length_is_truncated_as_eager_truncates_it(model, eager):
    import torch

    for prompt in ("instruction " * 100, "Find: "):
        got = _logits(model, AWKWARD + PAIRS, prompt=prompt)
        assert np.abs(got - eager.predict(AWKWARD + PAIRS, prompt=prompt, activation_fn=torch.nn.Identity())
                      ).max() <= TOLERANCE
    with pytest.raises(ConfigError, match=r"Prompt name 'web' not found: the model has no prompts"):
        model.predict(PAIRS, prompt_name="web")
    with pytest.raises(TypeError, match=r"prompt must be a string, found int"):
        model.predict(PAIRS, prompt=5)


# ----- adapters per call (item 24) -----
def test_concurrent_calls_with_different_adapters_never_mix(switchable, real_texts):
    pairs = [(text, real_texts[-1 - i]) for i, text in enumerate(real_texts[:24])]
    want = {adapter: _logits(switchable, pairs, adapter=adapter) for adapter in (False, "qv", "qk")}
    assert min(np.abs(want[a] - want[b]).max() for a, b in (("qv", False), ("qk", False), ("qv", "qk"))) > 1e-3
    mixed: list = []

    def caller(k: int) -> None:
        for i in range(12):
            adapter = (False, "qv", "qk")[(k + i) % 3]
            got = _logits(switchable, pairs, adapter=adapter, batch_size=(1, 5, 32)[i % 3])
            if np.abs(got - want[adapter]).max() > TOLERANCE:
                mixed.append((k, i, adapter))

    def switcher() -> None:  # set_adapter meanwhile changes only calls without their own adapter
        for i in range(60):
            switchable.set_adapter(("qv", "qk")[i % 2])

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)] + [threading.Thread(target=switcher)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    switchable.disable_adapters()
    assert mixed == []


@pytest.mark.parametrize("name", ["../qv", "adapters/qv.onnx_adapter", "/etc/passwd", "qv\x00", 5, True])
def test_adapter_names_that_are_not_loaded_are_refused_listing_the_loaded_ones(switchable, name):
    with pytest.raises(AdapterNotFoundError, match=r"Adapter with name .* not found\. Loaded adapters: "
                                                   r"\['qk', 'qv'\]"):
        switchable.predict(PAIRS, adapter=name)


def test_an_adapter_on_a_merged_export_is_refused_naming_predict(model):
    # The message named encode(adapter=...), a method CrossEncoderModel does not have.
    with pytest.raises(ConfigError, match=r"^predict\(adapter=\.\.\.\) needs a switchable export"):
        model.predict(PAIRS, adapter="qv")
    with pytest.raises(ConfigError, match=r"^predict\(adapter=\.\.\.\) needs a switchable export"):
        model.rank(QUERY, PASSAGES, adapter="qv")
