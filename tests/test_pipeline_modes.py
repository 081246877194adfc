"""Pooling modes, Dense + Normalize folded into the graph, plain PEFT adapters over plain encoders, the
legacy Sentence Transformers layout and overrides, each against sentence-transformers with the adapter loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from torch import nn

from conftest import POOLING_MODES, SENTENCE_ATOL, assert_same_embeddings, max_unit_diff
from conftest import pooling_case as build_pooling_case
from fixtures import tiny_models


@pytest.fixture(scope="module", params=POOLING_MODES)
def pooling_case(request, zoo):
    return build_pooling_case(zoo, request.param)


def test_each_pooling_mode_equals_sentence_transformers(pooling_case, real_texts):
    texts = real_texts[:48]
    reference = pooling_case.reference()
    model = pooling_case.embedding_model()
    assert model.config.pooling_modes == [reference[1].pooling_mode]
    expected = reference.encode(texts, batch_size=16)
    got = model.encode(texts, batch_size=16)
    assert_same_embeddings(got, expected)
    assert max_unit_diff(got, pooling_case.base_reference().encode(texts)) > 1e-3


def test_each_export_keeps_the_similarity_function(pooling_case, real_texts):
    reference = pooling_case.reference()
    model = pooling_case.embedding_model()
    assert model.similarity_fn_name == reference.similarity_fn_name
    a = model.encode(real_texts[:5])
    b = model.encode(real_texts[5:9])
    expected = reference.similarity(a, b).numpy()
    np.testing.assert_allclose(model.similarity(a, b), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        model.similarity_pairwise(a[:4], b), reference.similarity_pairwise(a[:4], b).numpy(), rtol=1e-5, atol=1e-4
    )


@pytest.fixture(scope="module")
def dense_case(zoo):
    """Pooling -> Dense(ReLU) -> Dense(Tanh) -> Normalize."""
    return zoo.case("dense", "bert", pooling="mean", dense=[(24, nn.ReLU()), (16, nn.Tanh())], normalize=True)


def test_dense_and_normalize_are_folded_into_the_graph(dense_case, real_texts):
    texts = real_texts[:40]
    reference = dense_case.reference()
    model = dense_case.embedding_model()
    assert model.get_sentence_embedding_dimension() == reference.get_embedding_dimension() == 16
    assert model.config.has_dense and model.config.normalize
    got = model.encode(texts)
    assert_same_embeddings(got, reference.encode(texts))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # One graph holds it all: the graph's own sentence output already has the Dense width, and is normalised.
    assert sorted(p.name for p in dense_case.export.glob("*.onnx")) == ["model.onnx"]
    raw = model.backend.run(model.tokenize(texts[:3]))["sentence_embedding"]
    assert raw.shape == (3, 16)
    np.testing.assert_allclose(raw, got[:3], atol=1e-5)


def test_dense_without_normalize_keeps_raw_scale(zoo, real_texts):
    case = zoo.case("dense-raw", "bert", pooling="cls", dense=[(20, nn.Identity())], normalize=False)
    texts = real_texts[:30]
    got = case.embedding_model().encode(texts)
    expected = case.reference().encode(texts)
    assert_same_embeddings(got, expected)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def test_full_st_model_with_adapter_option_equals_adapter_only_folder(zoo, bert_case, real_texts):
    """``merge-onnx BASE --adapter ADAPTER`` and ``merge-onnx ADAPTER_ONLY_FOLDER`` are the same model."""
    export = zoo.export("bert-via-adapter-option", bert_case.base, adapters=[str(bert_case.adapter)])
    from peft_export import EmbeddingModel

    texts = real_texts[:30]
    got = EmbeddingModel(export).encode(texts)
    assert max_unit_diff(got, bert_case.reference().encode(texts)) < SENTENCE_ATOL
    assert max_unit_diff(got, bert_case.embedding_model().encode(texts)) < SENTENCE_ATOL


def test_legacy_sentence_transformers_layout_is_read(zoo, bert_case, tmp_path, real_texts):
    """sentence_transformers.models.* module types and boolean pooling_mode_* keys (written by ST < 5)."""
    legacy_base = tiny_models.to_legacy_layout(bert_case.base, tmp_path / "legacy-base")
    legacy_adapter = tiny_models.to_legacy_layout(bert_case.adapter, tmp_path / "legacy-adapter")
    assert "sentence_transformers.models.Pooling" in (legacy_adapter / "modules.json").read_text()
    from peft_export import EmbeddingModel, export_onnx_model

    result = export_onnx_model(str(legacy_adapter), tmp_path / "out", base=str(legacy_base), log=lambda m: None)
    model = EmbeddingModel(result.path)
    assert model.config.pooling_modes == ["mean"] and model.config.normalize
    texts = real_texts[:20]
    assert max_unit_diff(model.encode(texts), bert_case.reference().encode(texts)) < SENTENCE_ATOL


# ---- a plain PEFT adapter over a plain transformers encoder (no modules.json) ----

@pytest.fixture(scope="module")
def plain_adapter(zoo):
    hf = zoo.hf("bert")
    return hf, zoo.peft_adapter("plain-bert", hf, "bert")


def test_plain_peft_adapter_defaults_to_mean_pooling(zoo, plain_adapter, real_texts):
    hf, adapter = plain_adapter
    assert not (hf / "modules.json").exists() and not (adapter / "modules.json").exists()
    export = zoo.export("plain-mean", adapter)
    from peft_export import EmbeddingModel

    model = EmbeddingModel(export)
    assert model.config.pooling_modes == ["mean"] and not model.config.normalize
    reference = tiny_models.st_reference(hf, adapter)  # ST also defaults a plain encoder to mean pooling
    texts = real_texts[:30]
    assert_same_embeddings(model.encode(texts), reference.encode(texts))


def test_plain_peft_adapter_pooling_and_normalize_overrides(zoo, plain_adapter, real_texts):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from peft_export import EmbeddingModel

    hf, adapter = plain_adapter
    export = zoo.export("plain-cls", adapter, pooling="cls", normalize=True)
    model = EmbeddingModel(export)
    assert model.config.pooling_modes == ["cls"] and model.config.normalize
    transformer = Transformer(str(hf), max_seq_length=model.max_seq_length)
    reference = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), "cls"), Normalize()], device="cpu"
    )
    reference.load_adapter(str(adapter))
    texts = real_texts[:30]
    got = model.encode(texts)
    assert_same_embeddings(got, reference.encode(texts))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_unknown_pooling_override_is_refused(plain_adapter, tmp_path):
    from peft_export import ConfigError, export_onnx_model

    _, adapter = plain_adapter
    with pytest.raises(ConfigError, match=r"^pooling='median' is not one of cls, max, mean"):
        export_onnx_model(str(adapter), tmp_path / "out", pooling="median", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_max_seq_length_override(zoo, bert_case, real_texts):
    from peft_export import EmbeddingModel

    export = zoo.export("bert-len16", bert_case.adapter, max_seq_length=16)
    model = EmbeddingModel(export)
    assert model.max_seq_length == 16
    reference = bert_case.reference()
    reference.max_seq_length = 16
    texts = [t for t in real_texts if len(t.split()) > 30][:20]
    tokens = model.encode(texts, output_value="token_embeddings")
    assert max(len(t) for t in tokens) == 16
    assert max_unit_diff(model.encode(texts), reference.encode(texts)) < SENTENCE_ATOL


def test_max_seq_length_beyond_the_position_table_is_refused(bert_case, tmp_path):
    from peft_export import ConfigError, export_onnx_model

    with pytest.raises(ConfigError, match=r"^max_seq_length=4096 exceeds the model's 128 positions"):
        export_onnx_model(str(bert_case.adapter), tmp_path / "out", max_seq_length=4096, log=lambda m: None)


def test_runtime_config_describes_the_pipeline(dense_case):
    config = json.loads((dense_case.export / "embedding_config.json").read_text())
    assert config["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert config["output_names"] == ["sentence_embedding", "token_embeddings"]
    assert config["dimension"] == 16
    assert config["max_seq_length"] == tiny_models.MAX_SEQ_LENGTH
    assert config["pooling_modes"] == ["mean"]
    assert config["normalize"] is True
    assert config["similarity_fn_name"] == "cosine"
