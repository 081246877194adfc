"""The last layer traced for the first token alone (export/first_token_layer.py): a BERT-like reranker's head reads
only [CLS] / <s>, so its export computes the last layer's queries, attention output and feed-forward block for that
row only. The logits must not move, the model must be restored afterwards, other layouts are traced whole, and the
exported graph must really run the last feed-forward block on one row per pair (and an embedder's on every token)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

from peft_export import CrossEncoderModel
from peft_export.export.first_token_layer import first_token_last_layer, last_layer

SIZES = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=64)


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(**SIZES, num_labels=1))
    else:
        model = RobertaForSequenceClassification(RobertaConfig(**SIZES, num_labels=2, pad_token_id=1))
    model.config._attn_implementation = "eager"
    return model.eval()


def _padded_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 100, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a short pair beside full-length ones: padding must stay masked for the first token too
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_the_first_token_layer_gives_the_same_logits_and_is_undone(kind):
    model, batch = _model(kind), _padded_batch()
    layer = last_layer(model)
    assert layer is model.base_model.encoder.layer[-1]
    with torch.no_grad():
        reference = model(**batch).logits
        with first_token_last_layer(model) as applied:
            pruned_states = model.base_model(**batch).last_hidden_state
            pruned = model(**batch).logits
        after = model(**batch).logits
    assert applied
    assert pruned_states.shape == (3, 1, SIZES["hidden_size"])  # one row per sequence left the last layer
    assert float((pruned - reference).abs().max()) < 1e-6
    assert "forward" not in vars(layer)  # the class's forward is back
    assert torch.equal(after, reference)


def test_a_layer_of_another_layout_is_traced_whole():
    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=4,
                                                                 hidden_dim=48, max_position_embeddings=64)).eval()
    assert last_layer(model) is None
    with first_token_last_layer(model) as applied:
        assert not applied


def _rows_into_last_ffn(folder, feeds: dict[str, np.ndarray]) -> tuple[int, ...]:
    """The shape of the input of the last layer's feed-forward output projection in the exported graph."""
    graph = onnx.load(str(folder / "model.onnx"))
    matmuls = [n for n in graph.graph.node if n.op_type == "MatMul" and "/output/dense/" in n.name
               and "/attention/" not in n.name]
    last = max(matmuls, key=lambda n: int(n.name.split("layer.")[1].split("/")[0]))
    graph.graph.output.extend([onnx.ValueInfoProto(name=last.input[0])])
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run([last.input[0]], {k: v for k, v in feeds.items() if k in names})[0].shape


def _feeds(batch: int, length: int) -> dict[str, np.ndarray]:
    ids = np.full((batch, length), 7, dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def test_a_reranker_export_runs_its_last_feed_forward_block_on_one_row_per_pair(reranker):
    shape = _rows_into_last_ffn(reranker["adapter_export"], _feeds(2, 9))
    assert shape[:-1] in ((2, 1), (2,)), shape
    # ... and still scores as before: the reranker tests compare every mode with eager CrossEncoder + PEFT; here
    # one direct check that a long padded batch agrees with pairs scored one at a time.
    model = CrossEncoderModel(reranker["adapter_export"])
    pairs = [("query", "a short passage"), ("query", " ".join(["a much longer passage"] * 30))]
    together = model.predict(pairs, batch_size=2)
    alone = np.concatenate([model.predict([p], batch_size=1) for p in pairs])
    assert np.abs(together - alone).max() < 1e-5


def test_an_embedding_export_keeps_every_token_in_its_last_layer(bert_case):
    shape = _rows_into_last_ffn(bert_case.export, _feeds(2, 9))
    assert shape[:-1] in ((2, 9), (18,)), shape
