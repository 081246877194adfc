"""merge-openvino: IR files, manifest and runtime config, f32 validation, fp16/int8 quality gates (weights only,
and weights + activations), refusals."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from openvino_fixtures import *  # noqa: F401,F403
from openvino_fixtures import requires_nncf, requires_openvino

from peft_export import ConfigError, EmbeddingModel, MissingDependencyError, OutputExistsError, ValidationError
from peft_export.runtime.config import MANIFEST_FILE, RUNTIME_CONFIG_FILE

pytestmark = requires_openvino


def _manifest(folder) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def _weight_matmuls_by_input(model) -> dict[str, bool]:
    """Each MatMul with a constant weight -> whether its activation input is quantized (comes from a
    FakeQuantize), read from the IR as OpenVINO loads it."""
    found = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        weight = op.input_value(1).get_node()
        while weight.get_type_name() in ("Convert", "Subtract", "Multiply", "FakeQuantize"):
            weight = weight.input_value(0).get_node()
        if weight.get_type_name() == "Constant":
            found[op.get_friendly_name()] = op.input_value(0).get_node().get_type_name() == "FakeQuantize"
    return found


def _read_ir(folder):
    import openvino

    return openvino.Core().read_model(str(folder / "openvino_model.xml"))


def test_fp32_export_writes_ir_config_and_manifest(tiny_exports):
    folder = tiny_exports["openvino-fp32"]
    assert (folder / "openvino_model.xml").is_file() and (folder / "openvino_model.bin").is_file()
    assert not list(folder.glob("*.onnx"))
    config = json.loads((folder / RUNTIME_CONFIG_FILE).read_text())
    assert config["backend"] == "openvino" and config["model_file"] == "openvino_model.xml"
    assert config["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert config["normalize"] is True and config["pooling_modes"] == ["mean"] and config["dimension"] == 32
    manifest = _manifest(folder)
    assert manifest["export"]["format"] == "openvino"
    assert manifest["export"]["weight_format"] == "fp32"
    assert manifest["export"]["files"] == ["openvino_model.xml", "openvino_model.bin"]
    assert manifest["merge_mode"] == "merged" and manifest["adapters"][0]["r"] == 4
    check = manifest["validation"]["openvino_vs_reference"]
    assert check["max_abs_diff"]["sentence_embedding"] <= 1e-5
    assert [2, 16] not in check["shapes_checked"]  # validated on shapes other than the traced one
    assert {1, 3, 7} <= {shape[0] for shape in check["shapes_checked"]}
    assert manifest["validation"]["adapter_vs_base_max_abs_diff"] > 1e-3


def test_fp32_ir_equals_the_onnx_export(tiny_exports):
    texts = ["Hi", "How do I reset my password?", "The quick brown fox jumps over the lazy dog."]
    onnx = EmbeddingModel(tiny_exports["onnx"]).encode(texts)
    ir = EmbeddingModel(tiny_exports["openvino-fp32"]).encode(texts)
    assert np.abs(onnx - ir).max() < 1e-6


def test_onnx_manifest_is_unchanged_by_the_shared_pipeline(tiny_exports):
    manifest = _manifest(tiny_exports["onnx"])
    digests = manifest["export"].pop("sha256")  # every graph file's hash, checked at load
    assert {"model.onnx", "tokenizer.json", "embedding_config.json"} <= set(digests)  # every file the runtime reads
    assert all(len(digest) == 64 for digest in digests.values())
    assert manifest["export"] == {"format": "onnx", "opset": 17, "dtype": "float32", "files": ["model.onnx"]}
    assert set(manifest["validation"]) == {"adapter_vs_base_max_abs_diff", "merged_vs_unmerged", "onnx_vs_reference",
                                           "attention_fusion"}
    assert json.loads((tiny_exports["onnx"] / RUNTIME_CONFIG_FILE).read_text())["backend"] == "onnxruntime"


@pytest.mark.parametrize("weight_format, min_mean_cosine, max_size_ratio", [("fp16", 0.999, 0.6), ("int8", 0.99, 0.45)])
def test_compressed_weights_pass_their_gate_and_record_it(tiny_exports, weight_format, min_mean_cosine,
                                                          max_size_ratio):
    kind = f"openvino-{weight_format}"
    if kind not in tiny_exports:
        pytest.skip("nncf is not installed (pip install 'peft_export[openvino]')")
    folder = tiny_exports[kind]
    manifest = _manifest(folder)
    assert manifest["export"]["weight_format"] == weight_format
    quality = manifest["validation"]["weight_compression"]
    assert quality["gate"] == {"min_mean_cosine": min_mean_cosine, "min_worst_cosine": 0.97,
                               "min_ndcg_retention": 0.995}
    assert quality["mean_cosine"] >= min_mean_cosine and quality["worst_cosine"] >= 0.97
    assert quality["worst_cosine"] <= quality["mean_cosine"] <= 1.0 + 1e-9
    assert quality["ndcg10_retention"] >= 0.995 and quality["texts"] >= 200
    assert quality["inference_precision"] == "f32" and quality["gate_data"]
    assert quality["chosen"] == quality["attempts"][0]["strategy"] and quality["attempts"][0]["failures"] == []
    # The fp32 IR was checked against PyTorch before compression.
    assert manifest["validation"]["openvino_vs_reference"]["max_abs_diff"]["sentence_embedding"] <= 1e-5
    fp32_bytes = (tiny_exports["openvino-fp32"] / "openvino_model.bin").stat().st_size
    assert (folder / "openvino_model.bin").stat().st_size < max_size_ratio * fp32_bytes
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("openvino_model")) == [
        "openvino_model.bin", "openvino_model.xml"]  # the candidate replaced the fp32 IR, nothing left over
    reference = EmbeddingModel(tiny_exports["openvino-fp32"]).encode(["How do I reset my password?"])
    got = EmbeddingModel(folder).encode(["How do I reset my password?"])
    assert 0 < np.abs(got - reference).max() < 0.05  # compressed: close, not identical


@requires_nncf
def test_int8_manifest_names_nncf(tiny_exports):
    entry = _manifest(tiny_exports["openvino-int8"])["export"]["weight_compression"]
    assert entry["tool"] == "nncf" and entry["mode"] == "int8_asym" and entry["nncf_version"]


def _constant_types(xml: Path) -> set[str]:
    import xml.etree.ElementTree as ElementTree

    return {layer.find("data").get("element_type") for layer in ElementTree.parse(xml).getroot().iter("layer")
            if layer.get("type") == "Const"}


@requires_nncf
def test_int4_weights_are_grouped_int4_and_record_the_rung(tiny_model, tiny_merged, tiny_exports, tmp_path):
    from peft_export.export.openvino import INT4_LADDER, OpenVinoFormat
    from peft_export.export.pipeline import ExportOptions, write_export
    from peft_export.export.gate import QualityGate

    lenient = QualityGate(min_mean_cosine=0.9, min_worst_cosine=0.5, min_ndcg_retention=0.5)
    options = ExportOptions(model_id=str(tiny_model["adapter"]), output=tmp_path / "int4",
                            base=str(tiny_model["base"]), gate=lenient)
    folder = write_export(tiny_merged, options, OpenVinoFormat("int4", options), log=lambda msg: None).path
    manifest = _manifest(folder)
    entry = manifest["export"]["weight_compression"]
    assert manifest["export"]["weight_format"] == "int4"
    assert entry["mode"] == "int4_asym" and entry["group_size"] == INT4_LADDER[0].group_size and entry["ratio"] == 1
    quality = manifest["validation"]["weight_compression"]
    assert quality["chosen"] == INT4_LADDER[0].strategy and quality["mean_cosine"] >= 0.9
    assert {"u4", "u8"} <= _constant_types(folder / "openvino_model.xml")  # int4 layers, int8 embeddings
    int8_bytes = (tiny_exports["openvino-int8"] / "openvino_model.bin").stat().st_size
    assert (folder / "openvino_model.bin").stat().st_size < int8_bytes
    text = ["How do I reset my password?"]
    got, reference = EmbeddingModel(folder).encode(text), EmbeddingModel(tiny_exports["openvino-fp32"]).encode(text)
    assert 0 < np.abs(got - reference).max() and float((got * reference).sum()) >= 0.9


@requires_nncf
def test_int4_that_no_rung_passes_is_refused_and_nothing_written(tiny_model, tiny_merged, tmp_path):
    from peft_export.export.openvino import INT4_LADDER, OpenVinoFormat
    from peft_export.export.pipeline import ExportOptions, write_export
    from peft_export.export.gate import QualityGate

    options = ExportOptions(model_id=str(tiny_model["adapter"]), output=tmp_path / "int4",
                            base=str(tiny_model["base"]), gate=QualityGate(min_mean_cosine=0.999999999))
    with pytest.raises(ValidationError, match="No int4-weight OpenVINO model passes the quality gate") as info:
        write_export(tiny_merged, options, OpenVinoFormat("int4", options), log=lambda msg: None)
    assert all(rung.strategy in str(info.value) for rung in INT4_LADDER)
    assert "weight_format='int8' (or 'fp32')" in str(info.value)
    assert not (tmp_path / "int4").exists()


@requires_nncf
def test_int8_static_quantizes_activations_and_passes_its_gate(tiny_exports):
    folder = tiny_exports["openvino-int8-static"]
    manifest = _manifest(folder)
    export = manifest["export"]
    assert export["weight_format"] == "int8" and "weight_compression" not in export
    assert export["quantization"]["tool"] == "nncf" and export["quantization"]["mode"] == "int8-static"
    assert "weight_compression" not in manifest["validation"]
    quality = manifest["validation"]["quantization"]
    assert quality["activations"] == "int8" and quality["calibration_texts"] == 300
    assert quality["mean_cosine"] >= 0.99 and quality["worst_cosine"] >= 0.97 and quality["ndcg10_retention"] >= 0.995
    assert quality["chosen"] == quality["attempts"][0]["strategy"] and quality["attempts"][0]["failures"] == []
    assert manifest["validation"]["openvino_vs_reference"]["max_abs_diff"]["sentence_embedding"] <= 1e-5
    # Every linear layer reads int8 activations; weight-only compression leaves them float.
    static = _weight_matmuls_by_input(_read_ir(folder))
    assert len(static) == quality["attempts"][0]["quantized_nodes"] == 12 and all(static.values())
    assert not any(_weight_matmuls_by_input(_read_ir(tiny_exports["openvino-int8"])).values())
    text = ["How do I reset my password?"]
    reference = EmbeddingModel(tiny_exports["openvino-fp32"]).encode(text)
    assert 0 < np.abs(EmbeddingModel(folder).encode(text) - reference).max() < 0.05


@requires_nncf
def test_int8_static_leaves_the_ignored_layers_in_float(tiny_exports):
    """The ladder's later rungs keep FFN projections in float: their inputs must not be quantized."""
    from peft_export.export.families import family_for
    from peft_export.export.openvino import quantize_int8_static
    from peft_export.runtime.config import RuntimeConfig
    from peft_export.runtime.tokenizer import TextTokenizer

    folder = tiny_exports["openvino-fp32"]
    tokenizer = TextTokenizer(folder, RuntimeConfig.load(folder))
    calibration = [feeds for _, feeds in tokenizer.batches(["a short one", "Some sentence about passwords."] * 4, 1)]
    model = _read_ir(folder)
    ignored = [name for name in _weight_matmuls_by_input(model) if family_for("bert").ffn_part(name) == "output"]
    assert len(ignored) == 2  # one per layer
    quantized = _weight_matmuls_by_input(quantize_int8_static(model, calibration, ignored))
    assert {name for name, q in quantized.items() if not q} == set(ignored)


def test_failed_quality_gate_fails_the_export_and_leaves_nothing(tiny_model, tiny_merged):
    from peft_export.export.openvino import OpenVinoFormat
    from peft_export.export.pipeline import ExportOptions, write_export
    from peft_export.export.gate import QualityGate

    out = tiny_model["root"] / "gate-fails"
    options = ExportOptions(model_id=str(tiny_model["adapter"]), output=out, base=str(tiny_model["base"]),
                            gate=QualityGate(min_mean_cosine=1.000001))  # no compression reaches this
    with pytest.raises(ValidationError, match=r"No fp16-weight OpenVINO model passes the quality gate \(all weights "
                                              r"stored as fp16: mean_cosine [01]\.\d+ < 1\.000001\)\. Nothing was "
                                              r"written"):
        write_export(tiny_merged, options, OpenVinoFormat("fp16", options), log=lambda msg: None)
    assert not out.exists()
    assert not list(out.parent.glob(f".peft-export-tmp-{out.name}-*"))


@requires_nncf
def test_failed_int8_static_gate_lists_every_rung_and_leaves_nothing(tiny_model, tiny_merged):
    from peft_export.export.openvino import OpenVinoFormat
    from peft_export.export.pipeline import ExportOptions, write_export
    from peft_export.export.gate import QualityGate

    out = tiny_model["root"] / "static-gate-fails"
    options = ExportOptions(model_id=str(tiny_model["adapter"]), output=out, base=str(tiny_model["base"]),
                            quantize="int8-static", gate=QualityGate(min_worst_cosine=1.000001))
    # A rung whose screen is already under the gate stops there ("screen worst_cosine ...").
    with pytest.raises(ValidationError, match=r"No int8-static OpenVINO model passes the quality gate \(per-channel, "
                                              r"all linear layers: (screen )?worst_cosine [01]\.\d+ < 1\.000001; "
                                              r"per-channel, FFN output projections kept in fp32: .*; per-channel, "
                                              r"whole FFN kept in fp32: (screen )?worst_cosine .*\)\. Nothing was "
                                              r"written\. .* or export without quantize\."):
        write_export(tiny_merged, options, OpenVinoFormat("fp32", options), log=lambda msg: None)
    assert not out.exists()
    assert not list(out.parent.glob(f".peft-export-tmp-{out.name}-*"))


@requires_nncf
def test_int8_climbs_the_ladder_when_ffn_outputs_do_not_survive_int8(tiny_model, tmp_path):
    """FFN output projections with an outlier input column (fed by a dead unit, so fp32 is unaffected): per-channel
    int8 rounds their real weights to zero; keeping them in fp32 passes."""
    import torch
    from transformers import BertModel

    from peft_export.export.api import export_openvino_model

    folder = tmp_path / "outliers"
    shutil.copytree(tiny_model["base"], folder)
    model = BertModel.from_pretrained(str(folder))
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.output.dense.weight.mul_(50)  # make the FFN matter to the embedding
            layer.intermediate.dense.bias[0] = -1e4  # GELU(-1e4) = 0: unit 0 is dead
            layer.output.dense.weight[:, 0] = 1e4  # ...and read with a huge weight
    model.save_pretrained(str(folder))
    result = export_openvino_model(str(folder), tmp_path / "out", weight_format="int8", log=lambda msg: None)
    quality = result.manifest["validation"]["weight_compression"]
    first, second = quality["attempts"][:2]
    assert first["strategy"] == "per-channel, all linear layers" and first["failures"]
    assert second["strategy"] == "per-channel, FFN output projections kept in fp32" and second["failures"] == []
    assert quality["chosen"] == second["strategy"] and second["excluded_nodes"] == 2
    assert second["quantized_nodes"] == first["quantized_nodes"] - 2


def test_fp16_gate_is_never_looser_than_0_999():
    from peft_export.export.openvino import gate_for
    from peft_export.export.gate import QualityGate

    lenient = QualityGate(min_mean_cosine=0.5, min_worst_cosine=0.5, min_ndcg_retention=0.5)
    assert gate_for("fp16", lenient).min_mean_cosine == 0.999
    assert gate_for("fp16", lenient).min_worst_cosine == 0.5
    assert gate_for("int8", lenient) == lenient


def test_gate_pairs_fall_back_to_stdlib_docstrings_without_the_demo(monkeypatch):
    from peft_export.export.openvino import gate_pairs

    monkeypatch.setitem(sys.modules, "peft_export.demo", None)  # an installation without the demo corpus
    pairs, source = gate_pairs(None)
    assert source == "standard-library docstring pairs" and len(pairs) >= 200
    assert all(p["query"].endswith(".") and len(p["passage"].split()) >= 8 for p in pairs)


def test_bad_gate_data_and_onnx_only_options_fail_fast(tiny_model, tmp_path):
    from peft_export.export.api import export_openvino_model

    few = tmp_path / "few.jsonl"
    few.write_text(json.dumps({"query": "q", "passage": "p"}) + "\n")
    with pytest.raises(ConfigError, match=r"few\.jsonl holds 1 pairs; the quality gate needs at least 20"):
        export_openvino_model(str(tiny_model["adapter"]), tmp_path / "x", weight_format="int8",
                              base=str(tiny_model["base"]), gate_data=str(few))
    with pytest.raises(ConfigError, match=r"quantize='int8' is for export_onnx_model; with export_openvino_model use "
                                          r"weight_format='int8' \(NNCF, int8 weights\) or quantize='int8-static'"):
        export_openvino_model(str(tiny_model["adapter"]), tmp_path / "x", base=str(tiny_model["base"]),
                              quantize="int8")
    with pytest.raises(ConfigError, match=r"quantize='int8-static' quantizes the fp32 weights itself; leave "
                                          r"weight_format at 'fp32' \(found 'fp16'\)"):
        export_openvino_model(str(tiny_model["adapter"]), tmp_path / "x", base=str(tiny_model["base"]),
                              quantize="int8-static", weight_format="fp16")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match=r"empty\.txt holds no calibration sentences"):
        export_openvino_model(str(tiny_model["adapter"]), tmp_path / "x", base=str(tiny_model["base"]),
                              quantize="int8-static", calibration_data=str(empty))
    assert not (tmp_path / "x").exists()


def test_unknown_weight_format_is_refused_before_loading(tiny_model):
    from peft_export.export.api import export_openvino_model

    with pytest.raises(ConfigError, match=r"^weight_format must be one of fp32, fp16, int8, int4, found 'int2'"):
        export_openvino_model(str(tiny_model["adapter"]), tiny_model["root"] / "x", weight_format="int2",
                              base=str(tiny_model["base"]))


def test_existing_output_is_refused_without_force(tiny_model, tiny_merged, tiny_exports):
    from peft_export.export.openvino import OpenVinoFormat
    from peft_export.export.pipeline import ExportOptions, write_export

    out = tiny_exports["openvino-fp32"]
    options = ExportOptions(model_id=str(tiny_model["adapter"]), output=out, base=str(tiny_model["base"]))
    with pytest.raises(OutputExistsError, match="already exists; pass force=True"):
        write_export(tiny_merged, options, OpenVinoFormat("fp32"), log=lambda msg: None)


def test_missing_openvino_names_the_extra(tiny_model, monkeypatch):
    from peft_export.export.api import export_openvino_model

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'peft_export\[openvino\]'"):
        export_openvino_model(str(tiny_model["adapter"]), tiny_model["root"] / "x", base=str(tiny_model["base"]))


def test_cli_rejects_an_unknown_weight_format(capsys):
    from peft_export.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["merge-openvino", "some-model", "--weight-format", "int2"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int2'" in capsys.readouterr().err


def test_cli_merge_openvino_exports_and_refuses_to_overwrite(tiny_model, tmp_path, capsys):
    from peft_export.cli import main

    out = tmp_path / "cli-export"
    code = main(["merge-openvino", str(tiny_model["adapter"]), "--base", str(tiny_model["base"]), "-o", str(out),
                 "--max-seq-length", "32"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "OpenVINO (f32 precision hint) == PyTorch reference" in printed
    assert json.loads((out / RUNTIME_CONFIG_FILE).read_text())["max_seq_length"] == 32
    assert main(["merge-openvino", str(tiny_model["adapter"]), "--base", str(tiny_model["base"]), "-o", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err


def test_cli_info_reports_weight_format_and_gate(tiny_exports, capsys):
    from peft_export.cli import main

    assert main(["info", str(tiny_exports["openvino-fp16"])]) == 0
    info = capsys.readouterr().out
    assert "openvino fp16 weights" in info
    assert "quality:     fp16 weights vs fp32: mean cosine 1.00000" in info and "NDCG@10 retention" in info
    if "openvino-int8-static" in tiny_exports:
        assert main(["info", str(tiny_exports["openvino-int8-static"])]) == 0
        info = capsys.readouterr().out
        assert "openvino int8 weights" in info and "quality:     int8 weights and activations vs fp32" in info


def test_cli_merge_openvino_offers_only_its_own_options(capsys):
    from peft_export.cli import main

    with pytest.raises(SystemExit):
        main(["merge-openvino", "--help"])
    usage = capsys.readouterr().out
    assert "--weight-format {fp32,fp16,int8,int4}" in usage and "--min-mean-cosine" in usage
    assert "--quantize {int8-static}" in usage and "--calibration-data" in usage
    assert "--opset" not in usage and "--dtype" not in usage and "--no-fuse-attention" not in usage


@pytest.mark.slow
@requires_nncf
@pytest.mark.parametrize("weight_format", ["fp16", "int8", "int8-static"])
def test_real_minilm_compressed_weights_pass_the_gate(minilm_adapter, tmp_path, weight_format):
    from sentence_transformers import SentenceTransformer

    from peft_export.export.api import export_openvino_model

    static = weight_format == "int8-static"
    result = export_openvino_model(str(minilm_adapter["adapter"]), tmp_path / weight_format,
                                   weight_format="fp32" if static else weight_format,
                                   quantize="int8-static" if static else None, base=str(minilm_adapter["base"]),
                                   log=lambda msg: None)
    quality = result.manifest["validation"]["quantization" if static else "weight_compression"]
    assert quality["mean_cosine"] >= (0.999 if weight_format == "fp16" else 0.99)
    assert quality["ndcg10_retention"] >= 0.995 and quality["worst_cosine"] >= 0.97
    reference = SentenceTransformer(str(minilm_adapter["base"]), device="cpu")
    reference.load_adapter(str(minilm_adapter["adapter"]))
    texts = ["How do I reset my password?", "Return a new array of given shape and type, filled with zeros.",
             "The quick brown fox jumps over the lazy dog."]
    got, want = EmbeddingModel(result.path).encode(texts), reference.encode(texts)
    assert ((got * want).sum(1) > 0.995).all()


@requires_nncf
def test_an_nncf_crash_is_one_clear_error_and_writes_nothing(tiny_model, tiny_merged, monkeypatch):
    import nncf

    from peft_export import ToolError
    from peft_export.export.openvino import OpenVinoFormat
    from peft_export.export.pipeline import ExportOptions, write_export

    def crash(*args, **kwargs):
        raise RuntimeError("cannot build the quantizer graph")

    monkeypatch.setattr(nncf, "quantize", crash)
    out = tiny_model["root"] / "nncf-crash"
    options = ExportOptions(model_id=str(tiny_model["adapter"]), output=out, base=str(tiny_model["base"]),
                            quantize="int8-static")
    with pytest.raises(ToolError, match=r"NNCF static int8 quantization \(nncf.quantize\) failed on this model: "
                                        r"RuntimeError: cannot build the quantizer graph"):
        write_export(tiny_merged, options, OpenVinoFormat("fp32", options), log=lambda msg: None)
    assert not out.exists() and not list(out.parent.glob(f".peft-export-tmp-{out.name}-*"))
