"""The int8 ladder built from a measurement: the probe finds outlier input channels and orders nodes by simulated
int8 error; the ladder reuses one fp32 reference, screens each rung before the full gate, stops at the first pass
and times every step. Tiny hand-built ONNX graphs, so every check runs in seconds."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from peft_export import ValidationError
from peft_export.export import quantize as quantize_module
from peft_export.export.int8_probe import probe, sensitivity_order, split_outliers
from peft_export.export.gate import QualityGate, screen_failures
from peft_export.tasks import RERANKER
from peft_export.export.quantize import quantize_with_gate, sensitivity_rungs

VOCAB, WIDTH, OUTLIER = 40, 32, 3


def _tiny_graph(path):
    """input_ids -> embedding (channel OUTLIER 60x the rest) -> MatMul 'smooth' -> MatMul 'spiky' (a weight row
    1000x the rest, on a dead input channel) -> masked mean -> sentence_embedding."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = rng.normal(size=(VOCAB, WIDTH)).astype(np.float32)
    table[:, OUTLIER] *= 60  # a fixed outlier channel, as trained encoders' hidden states carry
    smooth = rng.normal(size=(WIDTH, WIDTH)).astype(np.float32) / WIDTH**0.5
    spiky = rng.normal(size=(WIDTH, WIDTH)).astype(np.float32) / WIDTH**0.5
    smooth[:, 0] = 0.0  # channel 0 of 'a' is dead...
    spiky[0] = 1000.0  # ...so this row adds nothing in fp32, but per-column int8 scales sized to it round every
    # real weight of 'spiky' to zero
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "smooth"], ["a"], name="smooth"),
        helper.make_node("MatMul", ["a", "spiky"], ["b"], name="spiky"),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
        helper.make_node("Mul", ["b", "m3"], ["bm"]),
        helper.make_node("ReduceMean", ["bm"], ["sentence_embedding"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["b", WIDTH])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(smooth, "smooth"),
         numpy_helper.from_array(spiky, "spiky"), numpy_helper.from_array(np.array([2], np.int64), "axis2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _tokenize(texts):
    ids = np.array([[(sum(map(ord, t)) * (j + 3)) % VOCAB for j in range(6)] for t in texts], np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _embedder(path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda texts: session.run(["sentence_embedding"], _tokenize(texts))[0]


TEXTS = [f"calibration sentence number {i}" for i in range(32)]
PAIRS = [{"query": f"question {i}", "passage": f"an answer to question {i}, in a few words"} for i in range(40)]


def test_probe_finds_the_outlier_channel_and_ranks_the_spiky_node_first(tmp_path):
    nodes, seconds = probe(_tiny_graph(tmp_path / "m.onnx"), ["MatMul"], [_tokenize(TEXTS[:16]), _tokenize(TEXTS[16:])])
    by_name = {p.name: p for p in nodes}
    assert by_name["smooth"].outlier_channels == [OUTLIER] and by_name["spiky"].outlier_channels == []
    assert by_name["smooth"].input_absmax > 20 * by_name["smooth"].rest_absmax
    assert sensitivity_order(nodes) == ["spiky", "smooth"]
    assert by_name["spiky"].relative_error > 5 * by_name["smooth"].relative_error and seconds > 0


def test_outlier_split_is_exact_in_fp32_and_is_what_saves_int8(tmp_path):
    """The cause checked: the same node quantized with and without its outlier channel split off."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = _tiny_graph(tmp_path / "m.onnx")
    nodes, _ = probe(fp32, ["MatMul"], [_tokenize(TEXTS)])
    side = split_outliers(fp32, tmp_path / "split.onnx", nodes)
    assert side == ["smooth/outliers_fp32"]
    reference = _embedder(fp32)(TEXTS)
    np.testing.assert_allclose(_embedder(tmp_path / "split.onnx")(TEXTS), reference, atol=1e-4, rtol=1e-5)

    def error(source, exclude):
        out = tmp_path / f"q{len(exclude)}.onnx"
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude)
        return np.abs(_embedder(out)(TEXTS) - reference).max() / np.abs(reference).max()

    assert error(tmp_path / "split.onnx", ["spiky", *side]) < error(fp32, ["spiky"]) / 5


def test_rungs_keep_the_most_sensitive_nodes_first_and_grow():
    order = [f"n{i}" for i in range(40)]
    rungs = list(sensitivity_rungs(order))
    assert [excluded for _, excluded in rungs] == [[], order[:2], order[:6], order[:12]]
    assert rungs[0][0] == "all weight nodes int8" and rungs[1][0] == "2 most sensitive of 40 weight nodes kept in fp32"
    assert [len(e) for _, e in sensitivity_rungs(["a", "b"])] == [0, 1]  # no repeated rung on tiny graphs


def test_screen_rejects_on_worst_cosine_exactly_and_on_the_mean_with_a_margin():
    gate = QualityGate()
    assert screen_failures({"mean_cosine": 0.995, "worst_cosine": 0.96}, gate) == ["screen worst_cosine 0.96000 < 0.97"]
    assert screen_failures({"mean_cosine": 0.989, "worst_cosine": 0.98}, gate) == []  # within the margin
    assert screen_failures({"mean_cosine": 0.985, "worst_cosine": 0.98}, gate)[0].startswith(
        "screen mean_cosine 0.98500 < 0.99")


def test_a_rerankers_screen_judges_its_own_figures():
    gate = QualityGate()
    # the largest score difference exactly (a subset's max is at most the full set's), the mean with a margin
    assert screen_failures({"max_score_diff": 0.06, "mean_score_diff": 0.011}, gate, RERANKER) == [
        "screen max_score_diff 0.06000 > 0.05"]
    assert screen_failures({"max_score_diff": 0.04, "mean_score_diff": 0.013}, gate, RERANKER) == [
        "screen mean_score_diff 0.01300 > 0.01 + 0.002"]


def test_ladder_reuses_the_reference_screens_first_stops_at_the_first_pass_and_times_each_rung(tmp_path,
                                                                                                 monkeypatch):
    fp32 = _tiny_graph(tmp_path / "m.onnx")
    calls = {"reference": 0, "candidate_texts": [], "quantized": []}
    reference_embed = _embedder(fp32)

    def reference(texts):
        calls["reference"] += 1
        return reference_embed(texts)

    def fake_quantize(source, out, mode, exclude, *args):
        calls["quantized"].append(list(exclude))
        calls.setdefault("sources", []).append(source.name)
        shutil.copy(source, out)

    def make_candidate(path):
        # plain and split rungs: far off; the next (one node kept fp32, beside the split's side product): exact
        kept = [n for n in calls["quantized"][-1] if not n.endswith("/outliers_fp32")]

        def embed(texts):
            calls["candidate_texts"].append(len(texts))
            good = reference_embed(texts)
            return good if kept else good + np.random.default_rng(1).normal(size=good.shape) * 10

        return embed

    monkeypatch.setattr(quantize_module, "_quantize", fake_quantize)
    logs = []
    result = quantize_with_gate(fp32, tmp_path / "int8.onnx", reference, make_candidate, PAIRS, QualityGate(),
                                tokenize=_tokenize, probe_texts=TEXTS, log=logs.append)
    assert calls["reference"] == 1
    assert calls["candidate_texts"] == [48, 48, 48, 80]  # two rungs stopped at the screen; the third gated
    assert calls["sources"] == ["m.onnx", "split_m.onnx", "split_m.onnx"]  # plain graph first, then the split one
    assert calls["quantized"] == [[], ["smooth/outliers_fp32"], ["spiky", "smooth/outliers_fp32"]]  # most sensitive
    plain, split, third = result["attempts"]
    assert plain["strategy"] == "all weight nodes int8" and split["strategy"].startswith("all weight nodes int8; out")
    assert "mean_cosine" not in split and split["failures"][0].startswith("screen worst_cosine")
    assert set(split["seconds"]) == {"quantize", "screen"} and set(third["seconds"]) == {"quantize", "screen", "gate"}
    assert third["failures"] == [] and result["chosen"] == third["strategy"]
    assert third["strategy"].startswith("1 most sensitive of 2 weight nodes kept in fp32; outlier input channels")
    assert result["probe"]["outlier_split_nodes"] == 1 and result["probe"]["outlier_channels"] == [OUTLIER]
    assert (tmp_path / "int8.onnx").is_file() and len(logs) == 4 and "screen" in logs[2] and "passes" in logs[3]


def test_ladder_with_real_quantization_on_the_tiny_graph(tmp_path):
    fp32 = _tiny_graph(tmp_path / "m.onnx")
    result = quantize_with_gate(fp32, tmp_path / "int8.onnx", _embedder(fp32), _embedder, PAIRS, QualityGate(),
                                tokenize=_tokenize, probe_texts=TEXTS, log=lambda _: None)
    assert result["chosen"].startswith("1 most sensitive of 2 weight nodes kept in fp32")  # 'spiky' cannot be int8
    assert result["attempts"][-1]["mean_cosine"] > 0.999
    with pytest.raises(ValidationError, match=r"No int8 variant passes the quality gate \(all weight nodes int8: "
                                              r"screen worst_cosine"):
        quantize_with_gate(tmp_path / "m.onnx", tmp_path / "never.onnx", _embedder(tmp_path / "m.onnx"), _embedder,
                           PAIRS, QualityGate(min_mean_cosine=1.01, min_worst_cosine=1.01), tokenize=_tokenize,
                           probe_texts=TEXTS, log=lambda _: None)
    assert not (tmp_path / "never.onnx").exists()
