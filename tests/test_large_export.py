"""Exports over protobuf's 2 GiB, exercised on a tiny model by lowering the external-data threshold: one data file
that the graph references and nothing else, files readable like the rest of the folder, fusion and int8 on
external data, and bounded validation shapes."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from conftest import assert_same_embeddings

from peft_export import EmbeddingModel, export_onnx_model
from peft_export.export import onnx as onnx_format
from peft_export.export import validate
from peft_export.export.external_data import external_files, graph_tensors, pack_external_data
from peft_export.export.gate import QualityGate

LOOSE_GATE = QualityGate(min_mean_cosine=0.9, min_worst_cosine=0.5, min_ndcg_retention=0.5)


@pytest.fixture(scope="module")
def external_export(bert_case, tmp_path_factory):
    """The tiny BERT + adapter exported with every weight tensor over 1 KiB in external data."""
    patch = pytest.MonkeyPatch()
    patch.setattr(onnx_format, "EXTERNAL_DATA_THRESHOLD", 1024)
    try:
        out = tmp_path_factory.mktemp("large") / "external"
        export_onnx_model(str(bert_case.adapter), out, log=lambda msg: None)
    finally:
        patch.undo()
    return out


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_the_folder_holds_only_the_files_the_graph_references(external_export):
    names = sorted(p.name for p in external_export.iterdir())
    assert names == ["embedding_config.json", "model.onnx", "model.onnx_data", "peft_export.json", "tokenizer.json",
                     "tokenizer_config.json"]
    assert external_files(external_export / "model.onnx") == ["model.onnx_data"]
    manifest = json.loads((external_export / "peft_export.json").read_text())
    assert manifest["export"]["files"] == ["model.onnx", "model.onnx_data"]
    # The manifest counts the folder as it was before the manifest itself was written.
    assert manifest["size_bytes"] == sum(p.stat().st_size for p in external_export.iterdir()
                                         if p.name != "peft_export.json")


def test_every_file_is_readable_like_the_rest_of_the_folder(external_export):
    modes = {p.name: p.stat().st_mode & 0o777 for p in external_export.iterdir()}
    assert set(modes.values()) == {0o666 & ~_umask()}, modes
    assert external_export.stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_the_external_data_export_matches_sentence_transformers_after_a_move(external_export, bert_case, tmp_path,
                                                                              real_texts):
    moved = tmp_path / "moved"
    shutil.copytree(external_export, moved)
    assert_same_embeddings(EmbeddingModel(moved).encode(real_texts[:20]), bert_case.reference().encode(real_texts[:20]))


def test_int8_quantizes_an_external_data_graph_and_drops_the_fp32_data(bert_case, tmp_path, monkeypatch, quiet_log,
                                                                       real_texts):
    monkeypatch.setattr(onnx_format, "EXTERNAL_DATA_THRESHOLD", 1024)
    out = tmp_path / "int8"
    export_onnx_model(str(bert_case.adapter), out, quantize="int8", gate=LOOSE_GATE, log=quiet_log)
    manifest = json.loads((out / "peft_export.json").read_text())
    assert manifest["validation"]["quantization"]["external_data"] is True
    assert manifest["validation"]["attention_fusion"]["applied"] is True
    files = sorted(p.name for p in out.iterdir() if "onnx" in p.suffix)
    assert files == ["model_int8.onnx", "model_int8.onnx_data"]  # no fp32 model.onnx_data left behind
    assert manifest["export"]["files"] == files
    ops = [n.op_type for n in onnx.load(str(out / "model_int8.onnx")).graph.node]
    assert "QAttention" in ops
    got, want = EmbeddingModel(out).encode(real_texts[:20]), bert_case.reference().encode(real_texts[:20])
    assert ((got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)).min() > 0.9


def test_pack_external_data_gathers_per_tensor_files_into_one(bert_case, tmp_path):
    """torch.onnx's layout for large graphs (one file per tensor) becomes one aligned data file, same values."""
    source = tmp_path / "per-tensor"
    source.mkdir()
    inline = onnx.load(str(bert_case.export / "model.onnx"))
    onnx.save_model(onnx.load(str(bert_case.export / "model.onnx")), str(source / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=1024)
    assert len(list(source.iterdir())) > 10
    target = tmp_path / "packed"
    target.mkdir()
    pack_external_data(source / "model.onnx", target / "model.onnx", "weights.bin")
    assert sorted(p.name for p in target.iterdir()) == ["model.onnx", "weights.bin"]
    packed = onnx.load(str(target / "model.onnx"))
    want = {t.name: onnx.numpy_helper.to_array(t) for t in graph_tensors(inline.graph)}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in graph_tensors(packed.graph)}
    assert want.keys() == got.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    offsets = [int(e.value) for t in graph_tensors(onnx.load(str(target / "model.onnx"), load_external_data=False)
                                                     .graph) for e in t.external_data if e.key == "offset"]
    assert offsets and all(offset % 4096 == 0 for offset in offsets)


def test_validation_runs_full_length_at_batch_one_only(bert_case, tmp_path, monkeypatch, quiet_log):
    """Rule: the one long input runs at batch 1 up to LONG_MAX_TOKENS; rows of batches of several are cut to
    BATCHED_MAX_TOKENS (both lowered here below the tiny model's 64 positions)."""
    monkeypatch.setattr(validate, "LONG_MAX_TOKENS", 48)
    monkeypatch.setattr(validate, "BATCHED_MAX_TOKENS", 16)
    out = tmp_path / "bounded"
    export_onnx_model(str(bert_case.adapter), out, log=quiet_log)
    shapes = json.loads((out / "peft_export.json").read_text())["validation"]["onnx_vs_reference"]["shapes_checked"]
    assert [1, 48] in shapes
    assert all(length <= 16 for batch, length in shapes if batch > 1)
    assert max(batch for batch, _ in shapes) == 7


def test_validation_shape_rule_defaults():
    assert validate.token_limit(["one"]) == validate.LONG_MAX_TOKENS == 2048
    assert validate.token_limit(["one", "two"]) == validate.BATCHED_MAX_TOKENS == 256


def test_fusion_of_external_data_over_the_memory_limit_is_skipped_with_the_reason(bert_case, tmp_path, monkeypatch,
                                                                                  quiet_log):
    monkeypatch.setattr(onnx_format, "EXTERNAL_DATA_THRESHOLD", 1024)
    monkeypatch.setattr(onnx_format, "FUSION_WEIGHT_LIMIT", 10_000)
    out = tmp_path / "unfused"
    export_onnx_model(str(bert_case.adapter), out, log=quiet_log)
    fusion = json.loads((out / "peft_export.json").read_text())["validation"]["attention_fusion"]
    assert fusion["applied"] is False and fusion["external_data"] is True
    assert "optimizer would hold several copies" in fusion["reason"]
    assert "Attention" not in [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]


def test_a_rotary_family_over_the_memory_limit_is_fused_without_loading_its_weights(tmp_path, monkeypatch, quiet_log,
                                                                                    real_texts):
    """A Qwen3-0.6B-sized graph (2.4 GB, external data) was left unfused by the BERT optimizer's memory limit,
    although its family is fused by the attention rewrite alone; the rewrite now works on the graph without its
    weights, and the data file is the one the trace wrote."""
    from fixtures import family_models, text, tiny_models

    base = family_models.build_family_model("qwen3", tmp_path / "base", text.FALLBACK_SENTENCES)
    adapter = family_models.add_family_adapter(base, tmp_path / "adapter", "qwen3")
    monkeypatch.setattr(onnx_format, "EXTERNAL_DATA_THRESHOLD", 1024)
    monkeypatch.setattr(onnx_format, "FUSION_WEIGHT_LIMIT", 10_000)
    loads, real_load = [], onnx.load

    def spying_load(path, *args, **kwargs):
        loads.append(kwargs.get("load_external_data", True))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(onnx, "load", spying_load)
    out = tmp_path / "fused"
    export_onnx_model(str(adapter), out, base=str(base), log=quiet_log)
    monkeypatch.setattr(onnx, "load", real_load)
    fusion = json.loads((out / "peft_export.json").read_text())["validation"]["attention_fusion"]
    assert fusion["applied"] is True and fusion["external_data"] is True, fusion
    assert fusion["fused_operators"]["MultiHeadAttention"] == 2  # both layers of the tiny model
    assert loads and not any(loads), loads  # the fusion step never loaded the weights
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("MultiHeadAttention") == 2 and "Softmax" not in ops
    assert sorted(p.name for p in out.iterdir() if "onnx" in p.suffix) == ["model.onnx", "model.onnx_data"]
    reference = tiny_models.st_reference(base, adapter)
    assert_same_embeddings(EmbeddingModel(out).encode(real_texts[:20], prompt_name="query"),
                           reference.encode(real_texts[:20], prompt_name="query"))
