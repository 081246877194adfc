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


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_batch_size_must_be_a_positive_integer(model, batch_size):
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, found {batch_size!r}"):
        model.predict(PAIRS, batch_size=batch_size)


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
    real = model._tokenizer.tokenizer
    tokenized: list[int] = []

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def encode_batch(self, items, **kwargs):
            tokenized.append(max(len(a) + len(b) for a, b in items))
            return real.encode_batch(items, **kwargs)

    monkeypatch.setattr(model._tokenizer, "tokenizer", Counting())
    short = [(QUERY, f"short passage {i}") for i in range(100)]
    sizes = []
    for words in (20_000, 2_000_000):
        tokenized.clear()
        scores = _logits(model, [(QUERY, "word " * words)] + short)
        sizes.append(max(tokenized))
        assert abs(scores[0] - _logits(model, [(QUERY, "word " * 200)])[0]) <= TOLERANCE
        assert np.abs(scores[1:] - _logits(model, short, batch_size=1)).max() <= TOLERANCE
    assert sizes[0] == sizes[1] < 5_000


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
