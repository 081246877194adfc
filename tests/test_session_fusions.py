"""Which ONNX Runtime fusions a session gets: SkipLayerNormalization only off the CPU (it is slower there)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from peft_export.runtime.onnxruntime_backend import OnnxRuntimeBackend, SessionSettings

HIDDEN = 16


@pytest.fixture(scope="module")
def residual_layer_norm(tmp_path_factory):
    """A residual Add then LayerNormalization, the pattern ORT fuses into SkipLayerNormalization."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    shape = ["batch", "sequence", HIDDEN]
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(rng.random(HIDDEN, dtype=np.float32) + 0.5, "gamma"),
                     numpy_helper.from_array(rng.random(HIDDEN, dtype=np.float32), "beta")])
    path = tmp_path_factory.mktemp("fusions") / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _optimized_ops(path, settings, monkeypatch, tmp_path) -> tuple[list[str], OnnxRuntimeBackend]:
    saved = tmp_path / f"optimized-{settings.fuse_skip_layer_norm}.onnx"
    to_options = SessionSettings.to_session_options

    def with_saved_graph(self, ort):
        options = to_options(self, ort)
        options.optimized_model_filepath = str(saved)  # ORT writes the graph it runs
        return options

    monkeypatch.setattr(SessionSettings, "to_session_options", with_saved_graph)
    backend = OnnxRuntimeBackend(path, settings=settings)
    return [node.op_type for node in onnx.load(str(saved)).graph.node], backend


def test_cpu_sessions_keep_add_and_layer_norm_apart(residual_layer_norm, monkeypatch, tmp_path):
    ops, default = _optimized_ops(residual_layer_norm, SessionSettings(), monkeypatch, tmp_path)
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops
    assert default.describe()["disabled_optimizers"] == ["SkipLayerNormFusion"]
    # The name is right (ORT ignores unknown names): asking for the fusion gives it.
    fused_ops, fused = _optimized_ops(residual_layer_norm, SessionSettings(fuse_skip_layer_norm=True), monkeypatch,
                                      tmp_path)
    assert "SkipLayerNormalization" in fused_ops and "LayerNormalization" not in fused_ops
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 5, HIDDEN), dtype=np.float32),
             "skip": rng.standard_normal((2, 5, HIDDEN), dtype=np.float32)}
    np.testing.assert_allclose(default.run(feeds)["y"], fused.run(feeds)["y"], atol=1e-5)


def test_gpu_providers_keep_the_fusion_unless_told_otherwise():
    assert SessionSettings().disabled_optimizers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == []
    assert SessionSettings().disabled_optimizers([("CUDAExecutionProvider", {"device_id": 0})]) == []
    assert SessionSettings(fuse_skip_layer_norm=False).disabled_optimizers(["CUDAExecutionProvider"]) == [
        "SkipLayerNormFusion"]
    assert SessionSettings().disabled_optimizers(["CPUExecutionProvider"]) == ["SkipLayerNormFusion"]
