"""MergedAdapterBudget (`peft-export serve --merged-adapter-budget N`): the hottest adapters of a switchable export
run merged, at most N at a time, evicted least recently used first; cold adapters run through the LoRA branches and
answer the same (1e-6)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from switchable_fixtures import TEXTS, switchable_export

from peft_export import ConfigError, EmbeddingModel
from peft_export.serve.merged_budget import MergedAdapterBudget
from peft_export.serve import ServeSettings

HOT_COLD_ATOL = 1e-6


@pytest.fixture
def model() -> EmbeddingModel:
    return EmbeddingModel(switchable_export())


def touch(budget: MergedAdapterBudget, name: str, times: int = 1) -> None:
    for _ in range(times):
        budget.touch(name)


def test_fills_free_room_then_evicts_the_least_recently_used(model):
    budget = MergedAdapterBudget(model, 2, background=False, min_requests=3)
    touch(budget, "attn")
    touch(budget, "ffn")
    assert budget.merged() == ["attn", "ffn"] and model.merged_adapters() == ["attn", "ffn"]
    touch(budget, "attn")  # attn is now the most recent: ffn goes first
    assert budget.merged() == ["ffn", "attn"]
    touch(budget, "mixed", 2)  # below min_requests: not admitted yet
    assert model.merged_adapters() == ["attn", "ffn"] and budget.evictions == []
    touch(budget, "mixed")
    assert budget.evictions == ["ffn"]
    assert model.merged_adapters() == ["attn", "mixed"] and budget.merged() == ["attn", "mixed"]


def test_uniform_traffic_does_not_thrash_and_skewed_traffic_keeps_the_hot_ones(model):
    budget = MergedAdapterBudget(model, 2, background=False)
    names = list(model.list_adapters())
    for i in range(300):  # uniform round robin over 3 adapters, room for 2
        budget.touch(names[i % 3])
    assert len(budget.merges) == 2 and budget.evictions == []
    rng = random.Random(0)
    for _ in range(600):  # now "mixed" gets 80% of the traffic: it must end up merged, with one other
        budget.touch("mixed" if rng.random() < 0.8 else rng.choice(["attn", "ffn"]))
        assert len(model.merged_adapters()) <= 2
    assert "mixed" in model.merged_adapters()
    assert len(budget.merges) <= 4  # a swap or two, not one per request


def test_budget_holds_at_every_instant_with_background_merges(model):
    budget = MergedAdapterBudget(model, 1, min_requests=1, admit_ratio=1.0)
    rng = random.Random(1)
    seen = set()
    try:
        for _ in range(40):
            budget.touch(rng.choice(model.list_adapters()))
            merged = model.merged_adapters()
            assert len(merged) <= 1, merged
            seen.update(merged)
            budget.wait(timeout=60)
    finally:
        budget.close()
    assert len(budget.merges) >= 2 and len(seen) >= 2  # it did swap, and never held two


def test_hot_and_cold_answers_are_identical(model):
    texts = [t for t in TEXTS if t]
    cold = {name: model.encode(texts, adapter=name) for name in model.list_adapters()}
    budget = MergedAdapterBudget(model, 3, background=False)
    for name in model.list_adapters():
        budget.touch(name)
    assert model.merged_adapters() == model.list_adapters()
    for name, vectors in cold.items():
        hot = model.encode(texts, adapter=name)
        assert np.abs(hot - vectors).max() <= HOT_COLD_ATOL, name
        assert np.abs(hot - model.encode(texts, adapter=False)).max() > 1e-3  # and not the base


def test_pinned_adapters_stay_merged_and_do_not_count(model):
    model.merge_adapter("attn")
    budget = MergedAdapterBudget(model, 1, background=False, min_requests=1, admit_ratio=1.0)
    touch(budget, "attn", 5)
    touch(budget, "ffn")
    touch(budget, "mixed", 3)
    assert budget.pinned == {"attn"} and budget.evictions == ["ffn"]
    assert model.merged_adapters() == ["attn", "mixed"]


def test_bad_budgets_are_refused(model):
    with pytest.raises(ConfigError, match="count of adapters >= 0, found -1"):
        MergedAdapterBudget(model, -1)
    with pytest.raises(ConfigError, match="merged_adapter_budget must be a count of adapters >= 0, found 'two'"):
        ServeSettings(merged_adapter_budget="two")
    from switchable_fixtures import merged_export

    merged = EmbeddingModel(merged_export("attn"))
    with pytest.raises(ConfigError, match="needs a switchable export"):
        MergedAdapterBudget(merged, 2)
    from peft_export.serve.served_model import ServedModel

    with pytest.raises(ConfigError, match="--merged-adapter-budget 2 needs a switchable export with adapters; m has"):
        ServedModel(merged, ServeSettings(served_model_name="m", merged_adapter_budget=2))


def test_server_keeps_hot_adapters_merged_and_answers_like_encode(model):
    pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    import httpx
    from serve_support import serving

    texts = ["How do I reset my password?", "LoRA adds a low-rank update B @ A."]
    expected = {name: model.encode(texts, adapter=name) for name in model.list_adapters()}
    with serving(model, served_model_name="base", merged_adapter_budget=1) as server:
        budget = server.app.state.server.served.merged_budget
        for _ in range(12):
            response = httpx.post(server.url + "/v1/embeddings", json={"model": "mixed", "input": texts}, timeout=30)
            assert response.status_code == 200, response.text
            got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
            assert np.abs(got - expected["mixed"]).max() <= HOT_COLD_ATOL
            budget.wait(timeout=60)
        assert budget.merged() == ["mixed"] and len(model.merged_adapters()) == 1
        for name in ("attn", "ffn"):  # cold ones still answer correctly
            response = httpx.post(server.url + "/v1/embeddings", json={"model": name, "input": texts}, timeout=30)
            got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
            assert np.abs(got - expected[name]).max() <= HOT_COLD_ATOL
