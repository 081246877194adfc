"""int8 on the real all-mpnet-base-v2 (110M) with a LoRA adapter trained for real: both int8 paths pass the default
quality gate and say, per rung, what they measured and how long it took. Slow: minutes each on 2 cores."""

from __future__ import annotations

import json

import pytest

from peft_export import export_onnx_model, export_openvino_model
from peft_export.export.gate import QualityGate

pytestmark = pytest.mark.slow


def _manifest(folder):
    return json.loads((folder / "peft_export.json").read_text())


def test_onnx_int8_passes_the_default_gate_with_every_weight_matmul_int8(real_mpnet, tmp_path, quiet_log):
    out = tmp_path / "int8"
    export_onnx_model(str(real_mpnet.adapter), out, base=str(real_mpnet.base), quantize="int8", log=quiet_log)
    quant = _manifest(out)["validation"]["quantization"]
    chosen = next(a for a in quant["attempts"] if a["strategy"] == quant["chosen"])
    assert chosen["failures"] == [] and QualityGate().failures(chosen) == []
    assert chosen["mean_cosine"] >= 0.99 and chosen["worst_cosine"] >= 0.97 and chosen["ndcg10_retention"] >= 0.995
    # The probe found the outlier channels (the cause of the 0.889 collapse) and most MatMuls stay int8.
    assert quant["probe"]["outlier_split_nodes"] > 0 and quant["probe"]["weight_nodes"] == 72
    assert chosen["quantized_nodes"] >= 0.8 * quant["probe"]["weight_nodes"]
    assert all({"quantize", "screen"} <= set(a["seconds"]) for a in quant["attempts"])
    assert quant["seconds"]["total"] > 0 and (out / "model_int8.onnx").is_file()


def test_openvino_int8_static_passes_the_default_gate(real_mpnet, tmp_path, quiet_log):
    out = tmp_path / "ov"
    export_openvino_model(str(real_mpnet.adapter), out, base=str(real_mpnet.base), quantize="int8-static",
                          log=quiet_log)
    quant = _manifest(out)["validation"]["quantization"]
    chosen = next(a for a in quant["attempts"] if a["strategy"] == quant["chosen"])
    assert chosen["failures"] == [] and QualityGate().failures(chosen) == []
    assert all({"quantize", "screen"} <= set(a["seconds"]) for a in quant["attempts"])
