"""The runtime's fast path: tokenize once, batch by token length (optionally under a token budget), fetch only the
output the call needs, and keep memory flat when input lengths vary."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest

from peft_export.runtime.batches import plan_batches


def test_plan_batches_longest_first_and_capped_by_size():
    lengths = [3, 9, 5, 9, 1, 7]
    batches = plan_batches(lengths, batch_size=4)
    assert [list(b) for b in batches] == [[1, 3, 5, 2], [0, 4]]  # stable: the two 9s keep their order


def test_plan_batches_token_budget_limits_padded_size():
    lengths = [40, 40, 10, 10, 10, 10, 10, 10]
    batches = plan_batches(lengths, batch_size=32, max_batch_tokens=60)
    assert [list(b) for b in batches] == [[0], [1], [2, 3, 4, 5, 6, 7]]
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 60


def test_plan_batches_under_a_budget_keeps_short_inputs_out_of_a_long_batch():
    lengths = [256, 20, 240, 200, 18, 12]
    batches = [list(b) for b in plan_batches(lengths, batch_size=32, max_batch_tokens=1024)]
    assert batches == [[0, 2, 3], [1, 4, 5]]  # 200 is within a quarter of 256; 20 would be mostly padding
    assert [list(b) for b in plan_batches(lengths, batch_size=32)] == [[0, 2, 3, 1, 4, 5]]  # no budget: size only


def test_plan_batches_gives_an_input_over_budget_a_batch_of_its_own():
    assert [list(b) for b in plan_batches([500, 2], batch_size=8, max_batch_tokens=100)] == [[0], [1]]


def test_plan_batches_covers_every_index_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 128) for _ in range(1000)]
    batches = plan_batches(lengths, batch_size=32, max_batch_tokens=2048)
    assert sorted(int(i) for b in batches for i in b) == list(range(1000))
    assert all(len(b) <= 32 for b in batches)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"batch_size": 4, "max_batch_tokens": 0}, "max_batch_tokens"),
    ({"batch_size": 4, "max_batch_tokens": 2.5}, "max_batch_tokens"),
])
def test_plan_batches_refuses_bad_limits(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_batches([1, 2], **kwargs)


class _Spy:
    """Wraps a backend and a tokenizer to count what one encode call does."""

    def __init__(self, model):
        self.model = model
        self.runs: list[tuple[tuple[int, ...], list[str]]] = []
        self.tokenize_calls = 0
        backend_run, tokenize = model.backend.run, model._tokenizer.tokenize

        def run(feeds, outputs=None, **kw):
            self.runs.append((feeds["input_ids"].shape, list(outputs or [])))
            return backend_run(feeds, outputs, **kw)

        def counted(texts):
            self.tokenize_calls += 1
            return tokenize(texts)

        model.backend.run, model._tokenizer.tokenize = run, counted
        self._restore = (backend_run, tokenize)

    def close(self):
        self.model.backend.run, self.model._tokenizer.tokenize = self._restore


@pytest.fixture
def spy(bert_case):
    s = _Spy(bert_case.embedding_model())
    yield s
    s.close()


def test_one_tokenization_and_one_run_per_batch_fetching_only_the_sentence_embedding(spy, real_texts):
    texts = real_texts[:70]
    spy.model.encode(texts, batch_size=32, max_batch_tokens=None)  # sentence-transformers' batches
    assert spy.tokenize_calls == 1
    assert [shape[0] for shape, _ in spy.runs] == [32, 32, 6]
    assert all(outputs == ["sentence_embedding"] for _, outputs in spy.runs)


def test_default_token_budget_on_cpu_bounds_runs_and_keeps_results(spy, bert_model, real_texts):
    from peft_export.runtime.model import CPU_MAX_BATCH_TOKENS

    assert spy.model.max_batch_tokens == CPU_MAX_BATCH_TOKENS
    texts = real_texts[:100]
    got = spy.model.encode(texts)
    assert all(shape[0] == 1 or shape[0] * shape[1] <= CPU_MAX_BATCH_TOKENS for shape, _ in spy.runs)
    assert any(shape[0] < 32 for shape, _ in spy.runs)
    np.testing.assert_allclose(got, bert_model.encode(texts, max_batch_tokens=None), atol=1e-6)


def test_token_embeddings_fetch_only_token_embeddings(spy, real_texts):
    spy.model.encode(real_texts[:5], output_value="token_embeddings")
    assert spy.runs and all(outputs == ["token_embeddings"] for _, outputs in spy.runs)


def test_token_budget_bounds_every_padded_batch_and_keeps_results(spy, bert_model, real_texts):
    texts = real_texts[:120]
    expected = bert_model.encode(texts, batch_size=32)
    spy.runs.clear()
    got = spy.model.encode(texts, batch_size=32, max_batch_tokens=512)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert all(shape[0] == 1 or shape[0] * shape[1] <= 512 for shape, _ in spy.runs)
    assert len(spy.runs) > 4  # 120 texts at batch 32 would be 4 runs: the budget really split them


def test_batches_by_tokens_equal_one_by_one(bert_model, bert_reference, real_texts):
    texts = real_texts[:40]
    together = bert_model.encode(texts, batch_size=16)
    alone = np.stack([bert_model.encode(t) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(together, bert_reference.encode(texts, convert_to_numpy=True), atol=1e-5)


@pytest.mark.skipif(sys.platform != "linux", reason="reads peak RSS from /proc")
def test_memory_stays_flat_under_random_lengths(bert_case, real_texts):
    """After one warm-up pass at every length, hundreds of batches of random lengths must not grow peak memory."""
    model = bert_case.embedding_model()
    rng = random.Random(1)
    words = " ".join(real_texts).split()
    longest = " ".join(words[:2000])
    model.encode([longest] * 32)  # the largest batch this model can see: sets the arena's high-water mark
    for n in range(1, 33):
        model.encode([" ".join(words[:rng.randint(1, 200)]) for _ in range(n)])

    def peak_kib() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    before = peak_kib()
    for _ in range(300):
        batch = [" ".join(rng.sample(words, rng.randint(1, 300))) for _ in range(rng.randint(1, 32))]
        model.encode(batch)
    grown_mib = (peak_kib() - before) / 1024
    assert grown_mib < 16, f"peak RSS grew by {grown_mib:.1f} MiB over 300 random-length batches"
