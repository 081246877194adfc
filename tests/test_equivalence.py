"""Three-way equivalence on tiny BERT, RoBERTa (no token_type_ids) and DistilBERT with non-zero LoRA adapters:
the adapter changes the base; PEFT's merged model == the unmerged PEFT forward == the ONNX export run by
EmbeddingModel, all compared with sentence-transformers itself with the adapter loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SENTENCE_ATOL, TOKEN_ATOL, max_unit_diff

ARCH_CASES = ["bert_case", "roberta_case", "distilbert_case"]


@pytest.fixture(params=ARCH_CASES)
def case(request):
    return request.getfixturevalue(request.param)


def _merge_lora_layers(model) -> int:
    """Merge every injected LoRA layer in place with PEFT's own code; returns how many were merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.merge(safe_merge=True)
    return len(layers)


def _torch_forwards(case, texts):
    """(unmerged PEFT, merged) sentence and token embeddings of the ST reference with the adapter loaded."""
    reference = case.reference()
    features = reference.tokenize(texts)
    with torch.no_grad():
        unmerged = reference(dict(features))
        merged_layers = _merge_lora_layers(reference)
        assert merged_layers > 0
        merged = reference(dict(features))
    return features, unmerged, merged


def test_adapter_changes_the_base_model(case, real_texts):
    texts = real_texts[:40]
    adapted = case.reference().encode(texts)
    base = case.base_reference().encode(texts)
    assert max_unit_diff(adapted, base) > 1e-2


def test_merged_equals_unmerged_peft(case, real_texts):
    features, unmerged, merged = _torch_forwards(case, real_texts[:16])
    mask = features["attention_mask"].bool()
    assert max_unit_diff(merged["sentence_embedding"].numpy(), unmerged["sentence_embedding"].numpy()) < SENTENCE_ATOL
    token_diff = (merged["token_embeddings"][mask] - unmerged["token_embeddings"][mask]).abs().max().item()
    assert token_diff < TOKEN_ATOL


def test_export_equals_sentence_transformers_with_adapter(case, real_texts):
    texts = real_texts[:120]
    expected = case.reference().encode(texts, batch_size=16)
    got = case.embedding_model().encode(texts, batch_size=16)
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    assert max_unit_diff(got, expected) < SENTENCE_ATOL
    # The tiny models end with Normalize, so raw outputs are unit vectors too.
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_export_equals_merged_and_unmerged_token_embeddings(case, real_texts):
    texts = real_texts[:16]
    features, unmerged, merged = _torch_forwards(case, texts)
    got = case.embedding_model().encode(texts, output_value="token_embeddings")
    mask = features["attention_mask"].bool()
    for i, tokens in enumerate(got):
        n = int(mask[i].sum())
        assert tokens.shape == (n, unmerged["token_embeddings"].shape[-1])
        np.testing.assert_allclose(tokens, unmerged["token_embeddings"][i, :n].numpy(), atol=TOKEN_ATOL, rtol=0)
        np.testing.assert_allclose(tokens, merged["token_embeddings"][i, :n].numpy(), atol=TOKEN_ATOL, rtol=0)


def test_export_differs_from_base_model(case, real_texts):
    texts = real_texts[:20]
    got = case.embedding_model().encode(texts)
    base = case.base_reference().encode(texts)
    assert max_unit_diff(got, base) > 1e-2


def test_manifest_records_the_measured_parity(case):
    import json
    import hashlib

    manifest = json.loads((case.export / "peft_export.json").read_text())
    assert manifest["merge_mode"] == "merged"
    assert manifest["base"]["id"] == str(case.base)
    (adapter,) = manifest["adapters"]
    weights = case.adapter / "adapter_model.safetensors"
    assert adapter["sha256"] == {weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()}
    parity = manifest["validation"]
    assert parity["merged_vs_unmerged"]["sentence_embedding"] < SENTENCE_ATOL
    assert parity["onnx_vs_reference"]["max_abs_diff"]["sentence_embedding"] < SENTENCE_ATOL
    assert parity["onnx_vs_reference"]["max_abs_diff"]["token_embeddings"] < TOKEN_ATOL
    assert parity["adapter_vs_base_max_abs_diff"] > 1e-2
    # Validation ran on shapes other than the traced (2, 16).
    shapes = parity["onnx_vs_reference"]["shapes_checked"]
    assert {s[0] for s in shapes} >= {1, 3, 7}
    assert [2, 16] not in shapes
    assert any(batch > 1 and length < 64 for batch, length in shapes)  # a short padded batch, not only max length
    for package in ("torch", "transformers", "peft", "onnxruntime"):
        assert manifest["library_versions"][package]
