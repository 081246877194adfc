"""The OpenVINO runtime backend: broken IR files, backend choice, devices, precision, hints, threads."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures.export_edits import write_runtime_config
from openvino_fixtures import *  # noqa: F401,F403
from openvino_fixtures import requires_nncf, requires_openvino

from peft_export import ConfigError, EmbeddingModel, MissingDependencyError
from peft_export.runtime.config import RUNTIME_CONFIG_FILE

pytestmark = requires_openvino

TEXTS = ["Hi", "How do I reset my password?", "Return a new array of given shape and type, filled with zeros.",
         "The quick brown fox jumps over the lazy dog."] * 5


@pytest.fixture()
def ir_copy(tiny_exports, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_exports["openvino-fp32"], folder)
    return folder


def test_xml_without_bin_is_a_clear_error(ir_copy):
    (ir_copy / "openvino_model.bin").unlink()
    with pytest.raises(ConfigError, match=r"openvino_model\.xml has no weights file: .*openvino_model\.bin is "
                                          r"missing\. An OpenVINO model is two files"):
        EmbeddingModel(ir_copy)


def test_truncated_bin_is_a_clear_error(ir_copy):
    weights = ir_copy / "openvino_model.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=rf"openvino_model\.bin is truncated: it has {len(data) // 2} bytes but "
                                          rf"openvino_model\.xml needs {len(data)}"):
        EmbeddingModel(ir_copy)


def test_corrupt_xml_is_a_clear_error(ir_copy):
    xml = ir_copy / "openvino_model.xml"
    xml.write_text(xml.read_text()[:500])
    with pytest.raises(ConfigError, match=r"openvino_model\.xml is not a valid OpenVINO IR file"):
        EmbeddingModel(ir_copy)


def test_backend_is_chosen_from_the_folder(tiny_exports):
    assert EmbeddingModel(tiny_exports["openvino-fp32"]).backend.name == "openvino"
    assert EmbeddingModel(tiny_exports["onnx"]).backend.name == "onnxruntime"


def test_openvino_runs_an_onnx_export_too(tiny_exports):
    ort = EmbeddingModel(tiny_exports["onnx"])
    ov = EmbeddingModel(tiny_exports["onnx"], backend="openvino")
    assert ov.backend.name == "openvino"
    assert np.abs(ov.encode(TEXTS) - ort.encode(TEXTS)).max() < 1e-6


def test_onnxruntime_cannot_load_an_ir_folder(tiny_exports):
    with pytest.raises(ConfigError, match=r"holds an OpenVINO model \(openvino_model\.xml\), which ONNX Runtime "
                                          r"cannot run; load it with backend='openvino'"):
        EmbeddingModel(tiny_exports["openvino-fp32"], backend="onnxruntime")


def test_options_of_the_other_backend_are_refused(tiny_exports):
    with pytest.raises(ConfigError, match="inference_precision, performance_hint apply to backend='openvino' only"):
        EmbeddingModel(tiny_exports["onnx"], inference_precision="bf16", performance_hint="LATENCY")
    with pytest.raises(ConfigError, match="providers and session_settings apply to ONNX Runtime"):
        EmbeddingModel(tiny_exports["openvino-fp32"], providers=["CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="backend must be one of onnxruntime, openvino"):
        EmbeddingModel(tiny_exports["onnx"], backend="tensorrt")


def test_unknown_or_absent_devices_are_refused_with_the_available_ones(tiny_exports):
    with pytest.raises(ConfigError, match=r"OpenVINO device 'TPU' is not available; available: CPU.*AUTO"):
        EmbeddingModel(tiny_exports["openvino-fp32"], device="TPU")
    with pytest.raises(ConfigError, match="device='cuda' is an ONNX Runtime device; OpenVINO devices are CPU, GPU"):
        EmbeddingModel(tiny_exports["openvino-fp32"], device="cuda")
    from peft_export.runtime.openvino_backend import available_devices

    if not any(d.startswith("GPU") for d in available_devices()):
        with pytest.raises(ConfigError, match=r"OpenVINO device 'GPU' is not available \(an Intel GPU needs"):
            EmbeddingModel(tiny_exports["openvino-fp32"], device="GPU")


def test_auto_device_reports_where_it_runs(tiny_exports):
    model = EmbeddingModel(tiny_exports["openvino-fp32"], device="AUTO")
    assert model.backend.providers and model.backend.describe()["device"] == "AUTO"
    reference = EmbeddingModel(tiny_exports["openvino-fp32"]).encode(TEXTS)
    assert np.abs(model.encode(TEXTS) - reference).max() < 1e-5  # the f32 hint reaches the device AUTO picks


def test_default_precision_is_f32_and_settings_are_applied(tiny_exports):
    model = EmbeddingModel(tiny_exports["openvino-fp32"], intra_op_threads=1, performance_hint="throughput")
    info = model.info()["runtime"]
    assert info["inference_precision"] == "f32"
    assert info["num_threads"] == 1
    assert info["performance_hint"] == "THROUGHPUT"
    assert model.backend.parallel_requests >= 1


def test_bf16_is_opt_in_and_close(tiny_exports):
    import openvino

    f32 = EmbeddingModel(tiny_exports["openvino-fp32"]).encode(TEXTS)
    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(ConfigError, match="precision='bf16' needs BF16 support, which CPU lacks"):
            EmbeddingModel(tiny_exports["openvino-fp32"], inference_precision="bf16")
        return
    model = EmbeddingModel(tiny_exports["openvino-fp32"], inference_precision="bf16")
    assert model.info()["runtime"]["inference_precision"] == "bf16"
    got = model.encode(TEXTS)
    cosine = (got * f32).sum(1)
    assert cosine.min() > 0.999 and np.abs(got - f32).max() > 1e-6  # really bf16, and still close


def test_bad_settings_are_refused(tiny_exports):
    from peft_export.runtime.openvino_backend import OpenVinoSettings

    with pytest.raises(ConfigError, match="precision must be one of f32, bf16, f16, found 'int4'"):
        EmbeddingModel(tiny_exports["openvino-fp32"], inference_precision="int4")
    with pytest.raises(ConfigError, match="performance_hint must be one of LATENCY, THROUGHPUT, found 'fast'"):
        EmbeddingModel(tiny_exports["openvino-fp32"], performance_hint="fast")
    with pytest.raises(ConfigError, match="num_threads must be a positive integer or None, found 0"):
        EmbeddingModel(tiny_exports["openvino-fp32"], openvino_settings=OpenVinoSettings(num_threads=0))


def test_parallel_requests_give_the_sequential_result(tiny_exports):
    from peft_export.runtime.openvino_backend import OpenVinoSettings

    sequential = EmbeddingModel(tiny_exports["openvino-fp32"]).encode(TEXTS, batch_size=3)
    settings = OpenVinoSettings(performance_hint="THROUGHPUT", num_requests=3)
    parallel = EmbeddingModel(tiny_exports["openvino-fp32"], openvino_settings=settings)
    assert parallel.backend.parallel_requests == 3
    assert np.abs(parallel.encode(TEXTS, batch_size=3) - sequential).max() < 1e-6
    tokens = parallel.encode(TEXTS[:4], batch_size=1, output_value="token_embeddings")
    assert [t.shape[0] for t in tokens] == [len(e.ids) for e in parallel.tokenizer.encode_batch(TEXTS[:4])]


def test_adapters_in_the_config_of_a_merged_ir_are_refused(ir_copy):
    # Switchable OpenVINO exports are tested in test_switchable_openvino.py; a merged IR has no LoRA inputs.
    config = json.loads((ir_copy / RUNTIME_CONFIG_FILE).read_text())
    config["adapters"] = {"legal": {"rank": 8}}
    write_runtime_config(ir_copy, config)
    with pytest.raises(ConfigError, match=r"lists adapters \(legal\) but the graph has no LoRA branches"):
        EmbeddingModel(ir_copy)


def test_missing_openvino_package_names_the_extra(tiny_exports, monkeypatch):
    from peft_export.runtime import openvino_backend

    openvino_backend._core.cache_clear()
    monkeypatch.setitem(sys.modules, "openvino", None)
    try:
        with pytest.raises(MissingDependencyError, match=r"pip install 'peft_export\[openvino\]'"):
            EmbeddingModel(tiny_exports["openvino-fp32"])
    finally:
        openvino_backend._core.cache_clear()


def test_runtime_import_stays_torch_free():
    import subprocess

    code = ("import sys, peft_export.runtime, peft_export.runtime.openvino_backend, peft_export.runtime.backends; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'openvino', 'nncf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bench_counts_the_same_flops_per_token_in_ir_and_onnx(tiny_exports):
    from peft_export.bench.suite import linear_flops_per_token

    onnx = linear_flops_per_token(tiny_exports["onnx"] / "model.onnx")
    assert onnx and linear_flops_per_token(tiny_exports["openvino-fp32"] / "openvino_model.xml") == onnx


@requires_nncf
def test_bench_openvino_shapes_quick_reports_every_measure(tiny_exports, tmp_path, monkeypatch):
    import runpy

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "investigations" / "bench_openvino_shapes.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--quick", "--static-int8",
                                      str(tiny_exports["openvino-int8-static"]), "--fp32",
                                      str(tiny_exports["openvino-fp32"]), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    rows = json.loads((tmp_path / "bench_openvino_shapes.json").read_text())["rows"]
    assert rows[0]["contender"] == "static int8 IR, f32 hint" and rows[-1]["contender"] == "fp32 IR, f32 hint"
    for row in rows:
        for key in ("first_p50_ms", "first_max_ms", "second_p95_ms", "same_shape_ms", "alternating_ms",
                    "buckets_ms", "bucket_compile_s"):
            assert row[key] > 0, (row["contender"], key)
        assert row["distinct_lengths"] > 1
    assert rows[-1]["bucket_max_diff"] <= 1e-5  # f32 does not notice the padding
