"""merge-onnx fuses each attention block with ONNX Runtime's transformer optimizer, and keeps it only when the fused
graph still matches the PyTorch reference."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import assert_same_embeddings

from peft_export import EmbeddingModel, export_onnx_model
from peft_export.cli import main
from peft_export.runtime import onnxruntime_fusion

LAYERS = 2  # tests/fixtures/tiny_models.py


def _ops(folder) -> list[str]:
    config = json.loads((folder / "embedding_config.json").read_text())
    return [node.op_type for node in onnx.load(str(folder / config["model_file"])).graph.node]


@pytest.mark.parametrize("case_name", ["bert_case", "roberta_case", "distilbert_case"])
def test_every_tiny_architecture_is_fused_and_validated(case_name, request, real_texts):
    case = request.getfixturevalue(case_name)
    fusion = json.loads((case.export / "peft_export.json").read_text())["validation"]["attention_fusion"]
    assert fusion["applied"] is True
    assert fusion["fused_operators"]["Attention"] == LAYERS
    assert fusion["fused_vs_reference"]["max_abs_diff"]["sentence_embedding"] <= 1e-5
    ops = _ops(case.export)
    assert ops.count("Attention") == LAYERS and "Softmax" not in ops
    assert "SkipLayerNormalization" not in ops  # slower on CPU than Add + LayerNormalization
    # Same answers as sentence-transformers with the PEFT adapter.
    assert_same_embeddings(case.embedding_model().encode(real_texts[:40]), case.reference().encode(real_texts[:40]))


def test_no_fuse_attention_keeps_the_traced_graph_with_the_same_embeddings(bert_case, tmp_path, real_texts):
    out = tmp_path / "unfused"
    assert main(["merge-onnx", str(bert_case.adapter), "-o", str(out), "--no-fuse-attention"]) == 0
    ops = _ops(out)
    assert "Attention" not in ops and "Softmax" in ops
    assert "attention_fusion" not in json.loads((out / "peft_export.json").read_text())["validation"]
    unfused, fused = EmbeddingModel(out).encode(real_texts[:40]), bert_case.embedding_model().encode(real_texts[:40])
    assert np.abs(unfused - fused).max() < 1e-5


def test_a_fused_graph_that_fails_validation_is_not_kept(bert_case, tmp_path, monkeypatch, quiet_log, real_texts):
    real_fuse = onnxruntime_fusion.fuse_attention

    def broken_fuse(model, shape, **kwargs):
        fused, counts = real_fuse(model, shape, **kwargs)
        for tensor in fused.graph.initializer:
            if tensor.name.endswith("_qkv_weight"):  # a fusion that got the weights wrong
                weights = onnx.numpy_helper.to_array(tensor) * 1.5
                tensor.CopyFrom(onnx.numpy_helper.from_array(weights, tensor.name))
        return fused, counts

    monkeypatch.setattr(onnxruntime_fusion, "fuse_attention", broken_fuse)
    out = tmp_path / "kept-traced"
    export_onnx_model(str(bert_case.adapter), out, log=quiet_log)
    fusion = json.loads((out / "peft_export.json").read_text())["validation"]["attention_fusion"]
    assert fusion["applied"] is False and "does not match the PyTorch reference" in fusion["reason"]
    assert "Attention" not in _ops(out)
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.onnx"]  # the rejected candidate is gone
    assert_same_embeddings(EmbeddingModel(out).encode(real_texts[:20]), bert_case.reference().encode(real_texts[:20]))


def test_int8_quantizes_the_fused_attention(bert_case, tmp_path, quiet_log):
    from peft_export.export.gate import QualityGate

    out = tmp_path / "int8"
    export_onnx_model(str(bert_case.adapter), out, quantize="int8", log=quiet_log,
                      gate=QualityGate(min_mean_cosine=0.9, min_worst_cosine=0.5, min_ndcg_retention=0.5))
    ops = _ops(out)
    assert ops.count("QAttention") == LAYERS and "Attention" not in ops
    quantization = json.loads((out / "peft_export.json").read_text())["validation"]["quantization"]
    assert quantization["attempts"][0]["quantized_nodes"] == 4 * LAYERS  # QKV, output, FFN in, FFN out per layer


def test_int8_static_quantizes_the_traced_graph(bert_case, tmp_path, quiet_log):
    """ORT's static (QDQ) quantizer has no form of Attention: a fused graph would keep its query/key/value
    projections in fp32 while the manifest counted them as quantized. Static exports stay unfused and every
    projection gets int8 inputs and weights."""
    import onnx

    from peft_export.export.gate import QualityGate

    out = tmp_path / "int8-static"
    export_onnx_model(str(bert_case.adapter), out, quantize="int8-static", log=quiet_log,
                      gate=QualityGate(min_mean_cosine=0.9, min_worst_cosine=0.5, min_ndcg_retention=0.5))
    validation = json.loads((out / "peft_export.json").read_text())["validation"]
    assert validation["attention_fusion"]["applied"] is False
    assert "static (QDQ) quantizer has no form of the fused Attention" in validation["attention_fusion"]["reason"]
    graph = onnx.load(str(out / "model_int8.onnx")).graph
    producers = {output: node for node in graph.node for output in node.output}
    constants = {init.name for init in graph.initializer}

    def dequantized(name: str, constant: bool) -> bool:
        node = producers.get(name)
        return node is not None and node.op_type == "DequantizeLinear" and (node.input[0] in constants) == constant

    weighted = [n for n in graph.node if n.op_type == "MatMul" and dequantized(n.input[1], constant=True)]
    assert all(dequantized(n.input[0], constant=False) for n in weighted)  # int8 activations too
    assert len(weighted) == validation["quantization"]["attempts"][0]["quantized_nodes"] == 6 * LAYERS
    assert "Attention" not in _ops(out)


def test_attention_shape_comes_from_the_config():
    class Config:
        num_attention_heads, hidden_size = 12, 384

    assert onnxruntime_fusion.AttentionShape.of(Config()).to_dict() == {"num_heads": 12, "hidden_size": 384}
    Config.hidden_size = 385
    assert onnxruntime_fusion.AttentionShape.of(Config()) is None
    assert onnxruntime_fusion.AttentionShape.of(object()) is None


def test_fusion_leaves_no_optimizer_objects_behind(bert_case, zoo):
    """The optimizer's objects form reference cycles that hold copies of the graph; merge_adapter fuses once per
    merged adapter, so each call must free them (measured: +230 MB per MiniLM merge otherwise)."""
    import gc

    def graphs_alive() -> int:
        return sum(1 for o in gc.get_objects() if type(o).__name__ == "ModelProto")

    traced = zoo.export("bert-traced", bert_case.adapter, fuse_attention=False)
    model = onnx.load(str(traced / "model.onnx"))
    gc.collect()
    gc.disable()  # only the collection inside fuse_attention may free them
    try:
        before = graphs_alive()
        fused, counts = onnxruntime_fusion.fuse_attention(model, onnxruntime_fusion.AttentionShape(2, 32))
        left = graphs_alive() - before
    finally:
        gc.enable()
    assert counts["Attention"] == LAYERS
    assert "Attention" not in [node.op_type for node in model.graph.node]  # the input graph is not edited
    assert left == 1  # the fused graph it returned; no copies held by the optimizer's objects


def test_graphs_with_external_weights_are_fused_too(bert_case, tmp_path, monkeypatch, quiet_log, real_texts):
    """Over 2 GiB of weights go to model.onnx_data; the fused graph is written back the same way (the threshold is
    lowered here to exercise the path on a tiny model)."""
    from peft_export.export import onnx as onnx_format

    monkeypatch.setattr(onnx_format, "EXTERNAL_DATA_THRESHOLD", 1024)
    out = tmp_path / "external"
    export_onnx_model(str(bert_case.adapter), out, log=quiet_log)
    assert (out / "model.onnx_data").stat().st_size > 10_000
    fusion = json.loads((out / "peft_export.json").read_text())["validation"]["attention_fusion"]
    assert fusion["applied"] is True and fusion["external_data"] is True
    assert _ops(out).count("Attention") == LAYERS
    assert_same_embeddings(EmbeddingModel(out).encode(real_texts[:20]), bert_case.reference().encode(real_texts[:20]))


def test_an_optimizer_crash_keeps_the_traced_graph(bert_case, tmp_path, monkeypatch, quiet_log):
    def crash(model, shape, **kwargs):
        raise RuntimeError("symbolic shape inference failed on node X")

    monkeypatch.setattr(onnxruntime_fusion, "fuse_attention", crash)
    out = tmp_path / "crashed"
    export_onnx_model(str(bert_case.adapter), out, log=quiet_log)
    fusion = json.loads((out / "peft_export.json").read_text())["validation"]["attention_fusion"]
    assert fusion == {"applied": False, "reason": "ONNX Runtime's optimizer failed: RuntimeError: symbolic shape "
                                                  "inference failed on node X"}
    assert "Attention" not in _ops(out) and "Softmax" in _ops(out)


@pytest.mark.slow
def test_real_mpnet_merged_export_runs_fused_attention_within_1e5_of_eager_peft(real_mpnet, tmp_path, quiet_log,
                                                                                real_texts):
    """all-mpnet-base-v2 (12 layers, relative position bias) with a trained LoRA adapter: every attention block is
    one Attention node with the position bias as its attention_bias input (ONNX Runtime's optimizer alone fused
    none), and the fused graph equals sentence-transformers + PEFT."""
    from fixtures.tiny_models import st_reference

    out = tmp_path / "mpnet"
    export_onnx_model(str(real_mpnet.adapter), out, base=str(real_mpnet.base), log=quiet_log)
    fusion = json.loads((out / "peft_export.json").read_text())["validation"]["attention_fusion"]
    assert fusion["applied"] is True and fusion["fused_operators"]["Attention"] == 12
    assert fusion["fused_vs_reference"]["max_abs_diff"]["sentence_embedding"] <= 1e-5
    ops = _ops(out)
    assert ops.count("Attention") == 12 and "Softmax" not in ops
    texts = real_texts[:48] + [" ".join(real_texts[:40])]  # and one truncated at max_seq_length
    assert_same_embeddings(EmbeddingModel(out).encode(texts, batch_size=16),
                           st_reference(real_mpnet.base, real_mpnet.adapter).encode(texts, batch_size=16))
