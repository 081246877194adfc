"""The exported graph's interface: inputs exactly as the tokenizer emits them, outputs sentence_embedding then
token_embeddings, dynamic batch and sequence axes (RELIABILITY items 1 and 2)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from conftest import SENTENCE_ATOL, TOKEN_ATOL, max_unit_diff
from fixtures.tiny_models import ARCHS, MAX_SEQ_LENGTH

ARCH_CASES = {"bert": "bert_case", "roberta": "roberta_case", "distilbert": "distilbert_case"}


@pytest.fixture(params=sorted(ARCH_CASES))
def case(request):
    return request.getfixturevalue(ARCH_CASES[request.param])


def _graph(case) -> onnx.GraphProto:
    return onnx.load(str(case.export / "model.onnx")).graph


def test_inputs_are_exactly_what_the_tokenizer_emits(case):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(case.base))
    graph_inputs = [i.name for i in _graph(case).input]
    expected = ["input_ids", "attention_mask"] + (["token_type_ids"] if ARCHS[case.arch].uses_token_type_ids else [])
    assert graph_inputs == expected
    assert set(graph_inputs) <= set(tokenizer.model_input_names)
    assert ("token_type_ids" in graph_inputs) == (case.arch == "bert")
    model = case.embedding_model()
    assert model.backend.input_names == graph_inputs
    assert sorted(model.tokenize(["hello world"])) == sorted(graph_inputs)
    for graph_input in _graph(case).input:
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_outputs_are_sentence_then_token_embeddings(case):
    graph = _graph(case)
    assert [o.name for o in graph.output] == ["sentence_embedding", "token_embeddings"]
    assert case.embedding_model().backend.output_names == ["sentence_embedding", "token_embeddings"]


def test_batch_and_sequence_axes_are_symbolic(case):
    model_proto = onnx.load(str(case.export / "model.onnx"))
    assert max(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    graph = model_proto.graph
    for value in list(graph.input) + [graph.output[1]]:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, f"{value.name} has fixed axes {dims}"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param


def _random_features(reference, batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Real special tokens at both ends, random vocabulary in between, right padding on every other row."""
    tokenizer = reference.tokenizer
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = np.array([i for i in range(len(tokenizer)) if i not in special])
    ids = rng.choice(ordinary, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    for row in range(batch):
        n = length if row % 2 == 0 else max(1, length - 1 - row)
        ids[row, 0] = tokenizer.cls_token_id
        if n > 1:
            ids[row, n - 1] = tokenizer.sep_token_id
        ids[row, n:] = tokenizer.pad_token_id
        mask[row, n:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.mark.parametrize("batch", [1, 2, 7])
@pytest.mark.parametrize("length", [1, 16, MAX_SEQ_LENGTH])
def test_graph_runs_at_dynamic_shapes_and_matches_reference(case, batch, length):
    reference = case.reference()
    model = case.embedding_model()
    feeds = _random_features(reference, batch, length, seed=batch * 100 + length)
    outputs = model.backend.run(feeds)
    sentence, tokens = outputs["sentence_embedding"], outputs["token_embeddings"]
    assert sentence.shape == (batch, model.get_sentence_embedding_dimension())
    assert tokens.shape == (batch, length, 32)
    torch_features = {k: torch.from_numpy(v) for k, v in feeds.items() if k in model.backend.input_names}
    with torch.no_grad():
        expected = reference(torch_features)
    assert max_unit_diff(sentence, expected["sentence_embedding"].numpy()) < SENTENCE_ATOL
    mask = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(tokens[mask], expected["token_embeddings"].numpy()[mask], atol=TOKEN_ATOL, rtol=0)


def test_token_type_ids_are_wired_for_bert(bert_case, bert_reference, bert_model):
    feeds = _random_features(bert_reference, 3, 12, seed=5)
    feeds["token_type_ids"][:, 6:] = 1
    got = bert_model.backend.run(feeds)["sentence_embedding"]
    zeros = bert_model.backend.run({**feeds, "token_type_ids": np.zeros_like(feeds["input_ids"])})
    assert max_unit_diff(got, zeros["sentence_embedding"]) > 1e-3
    with torch.no_grad():
        expected = bert_reference({k: torch.from_numpy(v) for k, v in feeds.items()})["sentence_embedding"]
    assert max_unit_diff(got, expected.numpy()) < SENTENCE_ATOL


def test_extra_token_type_ids_feed_is_ignored_by_models_without_it(roberta_case):
    from peft_export.runtime.tokenizer import TextTokenizer

    model = roberta_case.embedding_model()
    assert "token_type_ids" not in model.backend.input_names
    full = TextTokenizer(model.path, model.config)
    full.input_names = ["input_ids", "attention_mask", "token_type_ids"]
    feeds = full.encode(["a sentence", "another, longer sentence to embed"])
    with_extra = model.backend.run(feeds)["sentence_embedding"]
    np.testing.assert_allclose(with_extra, model.encode(["a sentence", "another, longer sentence to embed"]),
                               atol=1e-6)
