"""Switchable reranker exports shared by the reranker export and serving tests: built once per session through the
``zoo`` (each test module wraps these in its own fixtures)."""

from __future__ import annotations

from pathlib import Path

from fixtures import tiny_models


def rerank_adapters(zoo, reranker) -> dict[str, Path]:
    """Two LoRA adapters of the tiny CrossEncoder with different targets and ranks: "qv" (query, value and every
    dense layer, the pooler's included) and "qk" (query and key, rank 8)."""
    second = zoo._once("ce-bert-lora-qk", lambda: tiny_models.add_cross_encoder_adapter(
        reranker["base"], zoo.path("ce-bert-lora-qk"), target_modules=("query", "key"), r=8, alpha=16, seed=2))
    return {"qv": reranker["adapter"], "qk": second}


def switchable_reranker(zoo, reranker) -> Path:
    """The switchable ONNX export of the tiny CrossEncoder with adapters "qv" and "qk"."""
    return zoo.export("ce-bert-switchable", reranker["base"], switchable=True,
                      adapters=[f"{name}={path}" for name, path in rerank_adapters(zoo, reranker).items()])
