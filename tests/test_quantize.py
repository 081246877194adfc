"""--quantize int8: the quality gate decides, records its figures, and refuses loudly when quality is lost."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peft_export import EmbeddingModel, ValidationError, export_onnx_model
from peft_export.demo import load_pairs
from peft_export.export.gate import QualityGate, measure_quality
from peft_export.tasks.embedding import EMBEDDING, ndcg_at_10

LENIENT = QualityGate(min_mean_cosine=0.9, min_worst_cosine=0.5, min_ndcg_retention=0.5)


def _outlier_encoder(zoo, name: str):
    """A tiny BERT whose fp32 output is ordinary but whose int8 version is garbage.

    In every layer one channel of each linear layer's input is dead (LayerNorm channel 0 zeroed, one value channel
    with zero weights and bias, one FFN unit pinned at GELU(-1e4) = 0); every projection gets a huge weight in
    that input column for every output row. fp32 multiplies those weights by zero, but per-channel int8 sizes each
    row's scale to the outlier, rounding every real weight to zero: no rung of the ladder, which keeps at most a
    third of the nodes in fp32, can pass.
    """
    import torch
    from transformers import AutoModel

    source = zoo.hf("bert")
    folder = zoo.path(name)
    model = AutoModel.from_pretrained(str(source))
    with torch.no_grad():
        for layer in model.encoder.layer:
            # Randomly initialised sublayers barely move the residual stream; make them matter.
            layer.attention.output.dense.weight.mul_(50)
            layer.output.dense.weight.mul_(50)
            value = layer.attention.self.value
            value.weight[0].zero_()
            value.bias[0] = 0.0
            layer.attention.output.dense.weight[:, 0] = 1e4
            layer.intermediate.dense.bias[0] = -1e4
            layer.output.dense.weight[:, 0] = 1e4
            for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
                norm.weight[0] = norm.bias[0] = 0.0
            for linear in (layer.attention.self.query, layer.attention.self.key, value, layer.intermediate.dense):
                linear.weight[:, 0] = 1e4
        model.embeddings.LayerNorm.weight[0] = model.embeddings.LayerNorm.bias[0] = 0.0
    model.save_pretrained(str(folder))
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_int8_gate_refuses_model_made_to_fail(zoo, tmp_path, quiet_log):
    folder = _outlier_encoder(zoo, "hf-outliers")
    out = tmp_path / "int8"
    with pytest.raises(ValidationError, match=r"No int8 variant passes the quality gate .*mean_cosine"):
        export_onnx_model(str(folder), out, quantize="int8", log=quiet_log)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".peft-export-tmp")]


def test_int8_export_records_gate_figures_that_match_a_recomputation(bert_case, zoo, tmp_path, quiet_log):
    out = tmp_path / "int8"
    result = export_onnx_model(str(bert_case.adapter), out, quantize="int8", gate=LENIENT, log=quiet_log)
    quant = result.manifest["validation"]["quantization"]
    assert result.manifest["export"]["dtype"] == "int8"
    assert (out / "model_int8.onnx").is_file() and not (out / "model.onnx").exists()
    assert json.loads((out / "embedding_config.json").read_text())["model_file"] == "model_int8.onnx"
    chosen = next(a for a in quant["attempts"] if a["strategy"] == quant["chosen"])
    assert chosen["quantized_nodes"] > 0 and chosen["failures"] == []

    fp32, int8 = bert_case.embedding_model(), EmbeddingModel(out)
    pairs = load_pairs("eval")
    again = measure_quality(lambda t: fp32.encode(t), lambda t: int8.encode(t), pairs, EMBEDDING)
    assert again["mean_cosine"] == pytest.approx(chosen["mean_cosine"], abs=1e-6)
    assert again["worst_cosine"] == pytest.approx(chosen["worst_cosine"], abs=1e-6)
    assert again["mean_cosine"] < 1.0  # int8 really is a different graph
    assert (out / "model_int8.onnx").stat().st_size < (bert_case.export / "model.onnx").stat().st_size


def test_info_prints_the_int8_gate_figures(bert_case, tmp_path, quiet_log, capsys):
    """`peft-export info` on an ONNX int8 export read figures the manifest did not hold (KeyError)."""
    from peft_export.cli import main

    out = tmp_path / "int8"
    export_onnx_model(str(bert_case.adapter), out, quantize="int8", gate=LENIENT, log=quiet_log)
    quant = json.loads((out / "peft_export.json").read_text())["validation"]["quantization"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert f"quality:     int8 weights vs fp32: mean cosine {quant['mean_cosine']:.5f}" in capsys.readouterr().out


def test_gate_thresholds_are_enforced_in_order():
    gate = QualityGate()
    good = {"mean_cosine": 0.995, "worst_cosine": 0.98, "ndcg10_retention": 0.999}
    assert gate.failures(good) == []
    assert gate.failures({**good, "worst_cosine": 0.96}) == ["worst_cosine 0.96000 < 0.97"]
    assert gate.failures({**good, "ndcg10_retention": float("nan")})  # NaN never passes


def test_ndcg_at_10_matches_hand_computation():
    rng = np.random.default_rng(0)
    passages = rng.normal(size=(12, 8))
    queries = passages.copy()
    assert ndcg_at_10(queries, passages) == pytest.approx(1.0)
    queries[0] = passages[1] * 5 + passages[0] * 0.1  # query 0 now ranks its own passage second
    scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        passages / np.linalg.norm(passages, axis=1, keepdims=True)).T
    rank0 = int((scores[0] > scores[0, 0]).sum())
    assert rank0 >= 1
    expected = (11 + (1 / np.log2(rank0 + 2) if rank0 < 10 else 0)) / 12
    assert ndcg_at_10(queries, passages) == pytest.approx(expected)


def test_gate_data_file_is_validated(bert_case, tmp_path, quiet_log):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"query": "q"}\n')
    with pytest.raises(ValueError, match="string 'query' and 'passage'"):
        export_onnx_model(str(bert_case.adapter), tmp_path / "o", quantize="int8", gate_data=str(bad), log=quiet_log)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", ["gate_data", "calibration_data"])
def test_unreadable_gate_or_calibration_files_are_config_errors(bert_case, tmp_path, quiet_log, option):
    """Binary files, missing paths and folders fail before any model is loaded, naming the option."""
    from peft_export import ConfigError

    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\xd0\x01\xff" * 16)
    cases = [(binary, rf"weights\.bin is not UTF-8 text \(.* at byte 1\); {option} must be a text file"),
             (tmp_path / "missing.jsonl", rf"cannot read {option} .*missing\.jsonl: No such file or directory"),
             (tmp_path, rf"cannot read {option} .*: Is a directory")]
    for path, message in cases:
        with pytest.raises(ConfigError, match=message):
            export_onnx_model(str(bert_case.adapter), tmp_path / "o", quantize="int8-static", log=quiet_log,
                              **{option: str(path)})
    assert not (tmp_path / "o").exists()


def test_gate_pairs_may_hold_unicode_line_separators(tmp_path):
    """JSON allows U+2028 unescaped inside strings; only newlines end a JSON line."""
    from peft_export.export.gate_data import load_pairs_file

    path = tmp_path / "pairs.jsonl"
    rows = [{"query": f"question {i}\u2028part two", "passage": f"answer {i}"} for i in range(20)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert load_pairs_file(path) == rows


def test_calibration_texts_default_to_training_pairs_and_avoid_the_gate_pairs(monkeypatch):
    import sys

    from peft_export.export.gate_data import calibration_texts, docstring_pairs

    gate = {p["query"] for p in load_pairs("eval")} | {p["passage"] for p in load_pairs("eval")}
    texts = calibration_texts(None)
    assert len(texts) == 300 and not gate & set(texts)
    monkeypatch.setitem(sys.modules, "peft_export.demo", None)  # an installation without the demo corpus
    fallback = calibration_texts(None)  # queries first, then their passages
    gate_queries = {p["query"] for p in docstring_pairs(500)}
    assert len(fallback) >= 100 and not gate_queries & set(fallback[: len(fallback) // 2])


def test_a_quantizer_crash_is_one_clear_error_and_writes_nothing(bert_case, tmp_path, quiet_log, monkeypatch):
    """A third-party quantizer failing on a model surfaces as ToolError naming the step, not as its traceback."""
    import onnxruntime.quantization as ort_quantization

    from peft_export import ToolError
    from peft_export.cli import main

    def crash(*args, **kwargs):
        raise RuntimeError("unsupported node in graph")

    monkeypatch.setattr(ort_quantization, "quantize_dynamic", crash)
    out = tmp_path / "int8"
    with pytest.raises(ToolError, match=r"ONNX Runtime's dynamic quantizer \(quantize_dynamic\) failed on this "
                                        r"model: RuntimeError: unsupported node in graph"):
        export_onnx_model(str(bert_case.adapter), out, quantize="int8", log=quiet_log)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".peft-export-tmp")]
    assert main(["merge-onnx", str(bert_case.adapter), "--quantize", "int8", "-o", str(out)]) == 2
