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


NLI_LABELS = ("contradiction", "entailment", "neutral")


def nli_reranker(zoo) -> dict[str, Path]:
    """A tiny CrossEncoder with three labels named as an NLI model's (id2label), two LoRA adapters of it
    ("nli-qv", "nli-qk", each with its own trained head) and their switchable ONNX export ("export")."""
    base = zoo._once("ce3-bert", lambda: tiny_models.build_cross_encoder(
        zoo.hf("bert"), zoo.path("ce3-bert"), num_labels=3, labels=NLI_LABELS, seed=3))
    adapters = {
        "nli-qv": zoo._once("ce3-lora-qv", lambda: tiny_models.add_cross_encoder_adapter(
            base, zoo.path("ce3-lora-qv"), target_modules=("query", "value"), seed=4)),
        "nli-qk": zoo._once("ce3-lora-qk", lambda: tiny_models.add_cross_encoder_adapter(
            base, zoo.path("ce3-lora-qk"), target_modules=("query", "key"), r=8, alpha=16, seed=5)),
    }
    export = zoo.export("ce3-bert-switchable", base, switchable=True,
                        adapters=[f"{name}={path}" for name, path in adapters.items()])
    return {"base": base, **adapters, "export": export}
