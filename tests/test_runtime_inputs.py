"""The torch-free runtime on awkward input (RELIABILITY items 16-19, 21): shapes of empty and single inputs,
odd characters, truncation, batching invariance, execution providers and devices."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest

from conftest import SENTENCE_ATOL, TOKEN_ATOL, max_unit_diff
from fixtures.text import EDGE_CASE_TEXTS

HAS_CUDA_EP = "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_encode_empty_list_gives_zero_rows(bert_model):
    out = bert_model.encode([])
    assert isinstance(out, np.ndarray) and out.shape == (0, 32) and out.dtype == np.float32
    assert bert_model.encode([], truncate_dim=8).shape == (0, 8)


def test_encode_single_string_gives_a_vector(bert_model, bert_reference):
    vector = bert_model.encode("one string")
    expected = bert_reference.encode("one string")
    assert vector.shape == expected.shape == (32,)
    assert max_unit_diff(vector, expected) < SENTENCE_ATOL
    assert bert_model.encode(["one string"]).shape == (1, 32)
    tokens = bert_model.encode("one string", output_value="token_embeddings")
    assert tokens.ndim == 2 and tokens.shape[1] == 32


def test_awkward_strings_are_deterministic_and_match_the_reference(bert_model, bert_reference):
    first = bert_model.encode(EDGE_CASE_TEXTS, batch_size=4)
    again = bert_model.encode(EDGE_CASE_TEXTS, batch_size=3)
    assert np.isfinite(first).all()
    np.testing.assert_allclose(first, again, atol=1e-6, rtol=0)
    alone = np.stack([bert_model.encode(t) for t in EDGE_CASE_TEXTS])
    np.testing.assert_allclose(first, alone, atol=SENTENCE_ATOL, rtol=0)
    assert max_unit_diff(first, bert_reference.encode(EDGE_CASE_TEXTS)) < SENTENCE_ATOL


@pytest.mark.parametrize("case_name", ["roberta_case", "distilbert_case"])
def test_awkward_strings_on_other_tokenizers(request, case_name):
    case = request.getfixturevalue(case_name)
    got = case.embedding_model().encode(EDGE_CASE_TEXTS)
    assert np.isfinite(got).all()
    assert max_unit_diff(got, case.reference().encode(EDGE_CASE_TEXTS)) < SENTENCE_ATOL


def test_long_inputs_are_truncated_exactly_like_the_reference(bert_model, bert_reference, real_texts):
    long_texts = [" ".join(real_texts[i : i + 8]) for i in range(0, 80, 8)]
    expected_ids = bert_reference.tokenize(long_texts)["input_ids"].numpy()
    assert expected_ids.shape[1] == bert_model.max_seq_length == bert_reference.max_seq_length
    got_ids = bert_model.tokenize(long_texts)["input_ids"]
    np.testing.assert_array_equal(got_ids, expected_ids)
    tokens = bert_model.encode(long_texts, output_value="token_embeddings")
    assert {len(t) for t in tokens} == {bert_model.max_seq_length}
    assert max_unit_diff(bert_model.encode(long_texts), bert_reference.encode(long_texts)) < SENTENCE_ATOL


def test_same_input_alone_and_among_longer_neighbours(bert_model, real_texts):
    short = ["Hi", "How do I reset my password?", ""]
    longer = sorted(real_texts[:30], key=len)[-12:]
    alone = bert_model.encode(short)
    batch = bert_model.encode(longer[:5] + short[:1] + longer[5:9] + short[1:] + longer[9:], batch_size=16)
    mixed = batch[[5, 10, 11]]
    np.testing.assert_allclose(mixed, alone, atol=SENTENCE_ATOL, rtol=0)
    for text, vector in zip(short, alone):
        np.testing.assert_allclose(bert_model.encode(text), vector, atol=SENTENCE_ATOL, rtol=0)


def test_results_come_back_in_input_order(bert_model, real_texts):
    texts = real_texts[:25]
    batched = bert_model.encode(texts, batch_size=4)
    one_by_one = np.stack([bert_model.encode(t) for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=SENTENCE_ATOL, rtol=0)
    tokens = bert_model.encode(texts, batch_size=4, output_value="token_embeddings")
    for text, t in zip(texts, tokens):
        np.testing.assert_allclose(t, bert_model.encode(text, output_value="token_embeddings"), atol=TOKEN_ATOL, rtol=0)


def test_repeated_calls_stay_identical(bert_model, real_texts):
    target = "Repeated calls must give the same embedding."
    first = bert_model.encode(target)
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 6))
        picks = [real_texts[int(i)] for i in rng.integers(0, len(real_texts), n)]
        out = bert_model.encode(picks + [target], batch_size=int(rng.integers(1, 8)))
        np.testing.assert_allclose(out[-1], first, atol=SENTENCE_ATOL, rtol=0)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"batch_size": 0}, ValueError, r"batch_size must be a positive integer, found 0"),
    ({"output_value": "pooled"}, ValueError, r"output_value must be one of"),
])
def test_invalid_encode_arguments(bert_model, kwargs, error, message):
    with pytest.raises(error, match=message):
        bert_model.encode(["x"], **kwargs)


def test_non_string_item_is_refused_naming_its_index(bert_model):
    with pytest.raises(TypeError, match=r"sentences\[1\] is int, expected str"):
        bert_model.encode(["fine", 3])


# ---- execution providers and devices ----

def test_unknown_execution_provider_is_refused_listing_the_available_ones(bert_case):
    from peft_export import ConfigError

    with pytest.raises(ConfigError,
                       match=r"'NoSuchExecutionProvider' is not available; available: .*CPUExecutionProvider"):
        bert_case.embedding_model(providers=["NoSuchExecutionProvider"])


def test_unknown_device_is_refused(bert_case):
    from peft_export import ConfigError

    with pytest.raises(ConfigError, match=r"device must be one of cpu, cuda, found 'tpu'"):
        bert_case.embedding_model(device="tpu")


def test_explicit_cpu_provider_and_thread_settings(bert_case, bert_model):
    model = bert_case.embedding_model(providers=["CPUExecutionProvider"], intra_op_threads=1)
    assert model.backend.providers == ["CPUExecutionProvider"]
    np.testing.assert_allclose(model.encode(["threads"]), bert_model.encode(["threads"]), atol=1e-6)


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime build has the CUDA execution provider")
def test_cuda_without_cuda_provider_says_so(bert_case):
    from peft_export import ConfigError

    with pytest.raises(ConfigError,
                       match=r"device='cuda' needs the CUDA execution provider.*pip install 'peft_export\[gpu\]'"):
        bert_case.embedding_model(device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_EP, reason="no CUDA execution provider in this onnxruntime build")
def test_cuda_device_matches_cpu(bert_case, bert_model, real_texts):
    model = bert_case.embedding_model(device="cuda")
    assert model.backend.providers[0] == "CUDAExecutionProvider"
    texts = real_texts[:32]
    assert max_unit_diff(model.encode(texts), bert_model.encode(texts)) < 1e-4


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_EP, reason="no CUDA execution provider in this onnxruntime build")
def test_cuda_binds_io_and_runs_an_fp16_export(bert_case, bert_model, real_texts, tmp_path):
    from peft_export import EmbeddingModel, export_onnx_model

    out = export_onnx_model(str(bert_case.adapter), tmp_path / "fp16", dtype="fp16", log=lambda m: None).path
    model = EmbeddingModel(out, device="cuda")
    assert model.backend.io_binding and model.backend.providers[0] == "CUDAExecutionProvider"
    texts = real_texts[:64]
    assert max_unit_diff(model.encode(texts, batch_size=16), bert_model.encode(texts)) < 2e-2


def test_io_binding_path_equals_plain_runs_on_cpu(bert_case, bert_model, real_texts):
    """The I/O-binding run (the CUDA default) forced on the CPU provider: same results, only wanted outputs."""
    from peft_export.runtime.onnxruntime_backend import SessionSettings

    model = bert_case.embedding_model(session_settings=SessionSettings(io_binding=True))
    assert model.backend.io_binding and model.backend.describe()["io_binding"] is True
    assert bert_model.backend.io_binding is False  # off by default on the CPU
    texts = real_texts[:40]
    np.testing.assert_allclose(model.encode(texts, batch_size=8), bert_model.encode(texts, batch_size=8), atol=1e-6)
    tokens = model.encode(texts[:3], output_value="token_embeddings")
    for got, expected in zip(tokens, bert_model.encode(texts[:3], output_value="token_embeddings")):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    feeds = model.tokenize(texts[:2])
    assert list(model.backend.run(feeds, ["sentence_embedding"])) == ["sentence_embedding"]


def test_missing_or_incomplete_export_folder(tmp_path, bert_case):
    import shutil

    from peft_export import ConfigError, EmbeddingModel

    with pytest.raises(ConfigError, match=r"Export folder not found"):
        EmbeddingModel(tmp_path / "nowhere")
    partial = shutil.copytree(bert_case.export, tmp_path / "partial")
    (partial / "peft_export.json").unlink()
    with pytest.raises(ConfigError, match=r"has no peft_export.json: the export did not finish"):
        EmbeddingModel(partial)
