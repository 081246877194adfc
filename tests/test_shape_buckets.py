"""OpenVINO shape buckets: inputs padded to a few lengths and batch sizes give the same results as unpadded ones."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import pooling_case
from openvino_fixtures import *  # noqa: F401,F403  (tiny_exports)

from peft_export import EmbeddingModel
from peft_export.runtime.shape_buckets import batch_bucket, length_bucket, pad_to_buckets

pytest.importorskip("openvino")


def test_length_buckets_are_powers_of_two_and_one_and_a_half_times_them():
    assert [length_bucket(n, None) for n in (1, 16, 17, 24, 25, 33, 49, 65, 97, 129, 257)] == [
        16, 16, 24, 24, 32, 48, 64, 96, 128, 192, 384]
    assert length_bucket(200, 256) == 256 and length_bucket(300, 256) == 300  # never past max_seq_length
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 9, 32, 33)] == [1, 2, 4, 8, 16, 32, 64]


def test_padding_goes_on_the_side_the_batch_is_padded_on():
    left = {"input_ids": np.array([[0, 5, 6], [7, 8, 9]]), "attention_mask": np.array([[0, 1, 1], [1, 1, 1]])}
    padded, padding = pad_to_buckets(left, pad_token_id=0, max_length=None)
    assert padded["input_ids"].shape == (2, 16) and padding.left
    np.testing.assert_array_equal(padded["input_ids"][:, -3:], left["input_ids"])
    assert not padded["attention_mask"][:, :-3].any()
    right = {"input_ids": np.array([[5, 6, 0], [7, 8, 9], [1, 2, 3]]),
             "attention_mask": np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]])}
    padded, padding = pad_to_buckets(right, pad_token_id=0, max_length=None)
    assert padded["input_ids"].shape == (4, 16) and not padding.left
    np.testing.assert_array_equal(padded["input_ids"][:3, :3], right["input_ids"])
    assert padded["attention_mask"][3].sum() == 1  # a padding row is never entirely masked
    outputs = {"sentence_embedding": np.ones((4, 8)), "token_embeddings": np.ones((4, 16, 8))}
    cropped = padding.crop(outputs)
    assert cropped["sentence_embedding"].shape == (3, 8) and cropped["token_embeddings"].shape == (3, 3, 8)


def test_bucketed_results_equal_unbucketed(bert_case, real_texts, tmp_path):
    from peft_export import export_openvino_model
    from peft_export.runtime.openvino_backend import OpenVinoSettings

    folder = export_openvino_model(str(bert_case.adapter), tmp_path / "ov", log=lambda msg: None).path
    plain = EmbeddingModel(folder)  # fp32 IR: no buckets by default
    bucketed = EmbeddingModel(folder, openvino_settings=OpenVinoSettings(shape_buckets=True))
    assert bucketed.backend.describe()["shape_buckets"] and not plain.backend.describe()["shape_buckets"]
    texts = real_texts[:23]  # batch sizes 7 and 23 are not powers of two; lengths vary
    for batch_size in (1, 7, 32):
        want = plain.encode(texts, batch_size=batch_size)
        got = bucketed.encode(texts, batch_size=batch_size)
        assert np.abs(got - want).max() <= 1e-6
    want_tokens = plain.encode(texts[:5], output_value="token_embeddings")
    got_tokens = bucketed.encode(texts[:5], output_value="token_embeddings")
    for got, want in zip(got_tokens, want_tokens):
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-6


def test_last_token_pooling_with_right_padding_is_unchanged_by_buckets(zoo, real_texts):
    """Last-token pooling reads the last unmasked token; padding added on the right must not move it."""
    from peft_export.runtime.config import RuntimeConfig
    from peft_export.runtime.openvino_backend import OpenVinoBackend, OpenVinoSettings
    from peft_export.runtime.tokenizer import TextTokenizer

    case = pooling_case(zoo, "lasttoken")
    config = RuntimeConfig.load(case.export)
    tokenizer = TextTokenizer(case.export, config)
    path = case.export / config.model_file
    plain = OpenVinoBackend(path, settings=OpenVinoSettings(shape_buckets=False))
    bucketed = OpenVinoBackend(path, settings=OpenVinoSettings(shape_buckets=True),
                               padding=(config.pad_token_id, config.max_seq_length))
    for texts in (real_texts[:1], real_texts[:5], real_texts[10:21]):
        feeds = tokenizer.encode(texts)
        want, got = plain.run(feeds), bucketed.run(feeds)
        for name in want:
            assert got[name].shape == want[name].shape and np.abs(got[name] - want[name]).max() <= 1e-6


def test_buckets_are_on_by_default_only_for_static_int8(tiny_exports):
    """Measured: padding to buckets pays only where kernels are slow to compile per shape (static int8)."""
    static = EmbeddingModel(tiny_exports["openvino-int8-static"])
    assert static.backend.describe()["shape_buckets"]
    for kind in ("openvino-fp32", "openvino-int8"):
        assert not EmbeddingModel(tiny_exports[kind]).backend.describe()["shape_buckets"], kind
