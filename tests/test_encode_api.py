"""EmbeddingModel.encode()/similarity() options against sentence-transformers: prompts (include_prompt True and
False), truncate_dim, normalize_embeddings, quantized precisions and the four similarity functions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fixtures.export_edits import write_runtime_config
from conftest import POOLING_MODES, SENTENCE_ATOL, assert_same_embeddings, max_unit_diff, pooling_case

PROMPTS = {"query": "query: ", "document": "a passage of text: "}


@pytest.fixture(scope="module")
def prompt_case(zoo):
    """Mean pooling that excludes the prompt tokens (include_prompt=False), with a default prompt."""
    return zoo.case("prompts", "bert", pooling="mean", normalize=True, prompts=PROMPTS, default_prompt_name="query",
                    include_prompt=False)


@pytest.fixture(scope="module")
def prompt_pair(prompt_case):
    return prompt_case.embedding_model(), prompt_case.reference()


@pytest.fixture(scope="module")
def raw_case(zoo):
    """Mean pooling without Normalize, so normalisation and truncation are visible."""
    return pooling_case(zoo, "mean")


@pytest.fixture(scope="module")
def raw_pair(raw_case):
    return raw_case.embedding_model(), raw_case.reference()


# ---- prompts ----

def test_export_carries_prompts(prompt_pair):
    model, reference = prompt_pair
    assert model.prompts == PROMPTS == reference.prompts
    assert model.config.default_prompt_name == "query" == reference.default_prompt_name
    assert model.config.include_prompt is False


def test_default_prompt_is_applied_like_sentence_transformers(prompt_pair, real_texts):
    model, reference = prompt_pair
    texts = real_texts[:24]
    got = model.encode(texts)
    assert max_unit_diff(got, reference.encode(texts)) < SENTENCE_ATOL
    explicit = model.encode(texts, prompt_name="query")
    assert max_unit_diff(got, explicit) < SENTENCE_ATOL
    no_prompt = model.encode(texts, prompt="")
    assert max_unit_diff(no_prompt, reference.encode(texts, prompt="")) < SENTENCE_ATOL
    assert max_unit_diff(no_prompt, got) > 1e-3  # the prompt really changed the input


@pytest.mark.parametrize("kwargs", [{"prompt_name": "document"}, {"prompt": "represent this sentence: "}])
def test_named_and_literal_prompts_exclude_prompt_tokens_like_sentence_transformers(prompt_pair, real_texts, kwargs):
    model, reference = prompt_pair
    texts = real_texts[24:48]
    got = model.encode(texts, **kwargs)
    assert max_unit_diff(got, reference.encode(texts, **kwargs)) < SENTENCE_ATOL
    assert max_unit_diff(got, model.encode(texts)) > 1e-3


def test_unknown_prompt_name_is_refused_listing_the_prompts(prompt_pair):
    model, _ = prompt_pair
    with pytest.raises(ValueError,
                       match=r"Prompt name 'passage' not found; the model has prompts \['document', 'query'\]"):
        model.encode(["x"], prompt_name="passage")


def test_prompt_with_include_prompt_true(bert_case, bert_model, bert_reference, real_texts):
    texts = real_texts[:16]
    got = bert_model.encode(texts, prompt="search query: ")
    assert max_unit_diff(got, bert_reference.encode(texts, prompt="search query: ")) < SENTENCE_ATOL
    assert max_unit_diff(got, bert_model.encode(texts)) > 1e-3


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_prompt_excluded_from_every_pooling_mode(zoo, tmp_path, real_texts, mode):
    """include_prompt=False is pooled outside the graph; check every mode against sentence-transformers.

    The export of a model whose Pooling has include_prompt=False differs from the include_prompt=True export only
    in embedding_config.json, so the test flips that flag on a copy instead of exporting six more models.
    """
    from peft_export import EmbeddingModel

    case = pooling_case(zoo, mode)
    folder = shutil.copytree(case.export, tmp_path / "export")
    config_path = folder / "embedding_config.json"
    config = json.loads(config_path.read_text())
    config["include_prompt"] = False
    write_runtime_config(folder, config)
    reference = case.reference()
    reference[1].include_prompt = False
    model = EmbeddingModel(folder)
    texts = real_texts[:20] + ["", "hi"]
    got = model.encode(texts, prompt="query: ", batch_size=8)
    expected = reference.encode(texts, prompt="query: ", batch_size=8)
    assert_same_embeddings(got, expected)


# ---- truncate_dim, normalize_embeddings ----

@pytest.mark.parametrize("normalize", [False, True])
def test_truncate_dim_like_sentence_transformers(raw_pair, real_texts, normalize):
    model, reference = raw_pair
    texts = real_texts[:20]
    got = model.encode(texts, truncate_dim=8, normalize_embeddings=normalize)
    expected = reference.encode(texts, truncate_dim=8, normalize_embeddings=normalize)
    assert got.shape == (20, 8)
    assert_same_embeddings(got, expected)
    single = model.encode(texts[0], truncate_dim=8)
    assert single.shape == (8,)


@pytest.mark.parametrize("bad", [0, -1, 33, 2.5, True])
def test_invalid_truncate_dim_is_refused(raw_pair, bad):
    model, _ = raw_pair
    with pytest.raises(ValueError, match=r"truncate_dim must be an integer in 1\.\.32"):
        model.encode(["x"], truncate_dim=bad)


def test_normalize_embeddings_like_sentence_transformers(raw_pair, real_texts):
    model, reference = raw_pair
    texts = real_texts[:20]
    raw = model.encode(texts)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    got = model.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got, reference.encode(texts, normalize_embeddings=True), atol=SENTENCE_ATOL, rtol=0)


# ---- precision ----

@pytest.mark.parametrize("precision, dtype, width", [("int8", np.int8, 32), ("uint8", np.uint8, 32),
                                                     ("binary", np.int8, 4), ("ubinary", np.uint8, 4)])
def test_precision_equals_sentence_transformers_quantize_embeddings(raw_pair, real_texts, precision, dtype, width):
    from sentence_transformers.util.quantization import quantize_embeddings

    model, reference = raw_pair
    texts = real_texts[:40]
    floats = model.encode(texts)
    got = model.encode(texts, precision=precision)
    assert got.dtype == dtype and got.shape == (40, width)
    np.testing.assert_array_equal(got, quantize_embeddings(floats, precision))
    # And the same as sentence-transformers' encode(precision=...): float noise (~1e-7) may move a value across
    # a bucket boundary, so allow one step on a handful of entries.
    expected = reference.encode(texts, precision=precision)
    assert expected.dtype == got.dtype and expected.shape == got.shape
    if precision.endswith("int8"):
        diff = np.abs(got.astype(np.int32) - expected.astype(np.int32))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    else:
        assert (got == expected).mean() > 0.99


def test_unknown_precision_is_refused(raw_pair):
    model, _ = raw_pair
    with pytest.raises(ValueError,
                       match=r"precision must be one of float32, int8, uint8, binary, ubinary, found 'int4'"):
        model.encode(["x"], precision="int4")


# ---- similarity ----

SIMILARITY_REFERENCE = {
    "cosine": ("cos_sim", "pairwise_cos_sim"),
    "dot": ("dot_score", "pairwise_dot_score"),
    "euclidean": ("euclidean_sim", "pairwise_euclidean_sim"),
    "manhattan": ("manhattan_sim", "pairwise_manhattan_sim"),
}


@pytest.mark.parametrize("fn", sorted(SIMILARITY_REFERENCE))
def test_similarity_functions_equal_sentence_transformers_util(raw_pair, real_texts, fn):
    from sentence_transformers import util

    from peft_export.runtime import similarity, similarity_pairwise

    model, _ = raw_pair
    a = model.encode(real_texts[:6])
    b = model.encode(real_texts[6:10])
    matrix_fn, pairwise_fn = (getattr(util, name) for name in SIMILARITY_REFERENCE[fn])
    got = similarity(a, b, fn)
    assert got.shape == (6, 4)
    np.testing.assert_allclose(got, matrix_fn(torch.from_numpy(a), torch.from_numpy(b)).numpy(), rtol=1e-5, atol=1e-5)
    got_pairs = similarity_pairwise(a[:4], b, fn)
    assert got_pairs.shape == (4,)
    np.testing.assert_allclose(got_pairs, pairwise_fn(torch.from_numpy(a[:4]), torch.from_numpy(b)).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_similarity_accepts_single_vectors(bert_model):
    a = bert_model.encode("a cat sits on the mat")
    b = bert_model.encode(["a cat sits on the mat", "stock markets fell today"])
    sims = bert_model.similarity(a, b)
    assert sims.shape == (1, 2)
    assert sims[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert sims[0, 1] < sims[0, 0]


def test_similarity_bad_inputs_give_clear_errors_or_defined_values(bert_model):
    from peft_export.runtime import similarity

    a = np.ones((2, 32), np.float32)
    with pytest.raises(ValueError, match=r"Embedding dimensions differ: a has 32, b has 16"):
        bert_model.similarity(a, np.ones((2, 16), np.float32))
    nan = a.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"b contains NaN or Inf values"):
        bert_model.similarity(a, nan)
    with pytest.raises(ValueError, match=r"as many rows in a \(2\) as in b \(1\)"):
        bert_model.similarity_pairwise(a, a[:1])
    zero = np.zeros((1, 32), np.float32)
    np.testing.assert_array_equal(similarity(zero, a, "cosine"), [[0.0, 0.0]])  # defined, not NaN
