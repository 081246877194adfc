"""EmbeddingModel's adapter methods on a switchable export: PEFT's meaning, per-call selection that leaves the
model's state alone, thread safety, on-the-fly loading, and clear refusals (merged exports, bad files)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from switchable_fixtures import (ADAPTERS, TAMPERED_ADAPTERS, TEXTS, concurrent_adapter_errors, copy_export,
                                 make_adapter, max_unit_diff, merged_export, st_references, switchable_export)

from peft_export import AdapterNotFoundError, ConfigError, EmbeddingModel, UnsafeModelError

SENTENCE_ATOL = 1e-5


@pytest.fixture
def model() -> EmbeddingModel:
    return EmbeddingModel(switchable_export())


def test_set_disable_enable_have_peft_meaning(model):
    expected = st_references()
    model.set_adapter("attn")
    assert model.active_adapters() == ["attn"] and model.active_adapter() == "attn"
    model.disable_adapters()
    assert model.active_adapters() == ["attn"]  # PEFT keeps the active adapter while disabled
    assert max_unit_diff(model.encode(TEXTS), expected[None]) <= SENTENCE_ATOL
    model.set_adapter("ffn")  # still disabled, as in PEFT
    assert max_unit_diff(model.encode(TEXTS), expected[None]) <= SENTENCE_ATOL
    model.enable_adapters()
    assert max_unit_diff(model.encode(TEXTS), expected["ffn"]) <= SENTENCE_ATOL
    with pytest.raises(AdapterNotFoundError, match="Adapter with name 'nope' not found"):
        model.set_adapter("nope")
    model.set_adapter(["ffn"])  # a one-element list is that adapter (several: tests/test_stacked_adapters.py)
    assert model.active_adapters() == ["ffn"] and model.active_adapter() == "ffn"


def test_per_call_adapter_leaves_the_model_state_alone(model):
    expected = st_references()
    model.set_adapter("mixed")
    assert max_unit_diff(model.encode(TEXTS, adapter="attn"), expected["attn"]) <= SENTENCE_ATOL
    assert max_unit_diff(model.encode(TEXTS, adapter=False), expected[None]) <= SENTENCE_ATOL
    assert model.active_adapters() == ["mixed"]
    assert max_unit_diff(model.encode(TEXTS), expected["mixed"]) <= SENTENCE_ATOL
    assert model.encode("one string", adapter="ffn").shape == (32,)
    assert model.encode([], adapter="ffn").shape == (0, 32)
    with pytest.raises(AdapterNotFoundError, match="Loaded adapters: \\['attn', 'ffn', 'mixed'\\]"):
        model.encode(TEXTS, adapter="../attn")


def test_delete_adapter_falls_back_like_peft(model):
    model.set_adapter("ffn")
    with pytest.warns(UserWarning, match="ffn was active which is now deleted. Setting active adapter to attn"):
        model.delete_adapter("ffn")
    assert model.list_adapters() == ["attn", "mixed"] and model.active_adapters() == ["attn"]
    with pytest.raises(AdapterNotFoundError, match="not present and cannot be deleted: ffn"):
        model.delete_adapter("ffn")
    model.delete_adapter(["attn", "mixed"])
    assert model.list_adapters() == [] and model.active_adapters() == []
    assert max_unit_diff(model.encode(TEXTS), st_references()[None]) <= SENTENCE_ATOL
    assert (switchable_export() / "adapters" / "ffn.onnx_adapter").is_file()  # deleting never touches the disk


def test_adapter_state_dict_is_the_exact_scaled_update(model):
    from safetensors.numpy import load_file

    state = model.get_adapter_state_dict("mixed")
    saved = load_file(str(make_adapter("mixed") / "adapter_model.safetensors"))
    config = ADAPTERS["mixed"]
    for module, rank, alpha in (("encoder.layer.0.attention.self.value", 2, 16),
                                ("encoder.layer.1.intermediate.dense", 4, 8)):
        lora_a, lora_b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        assert lora_a.shape == (rank, 32)
        peft_a = saved[f"base_model.model.{module}.lora_A.weight"]
        peft_b = saved[f"base_model.model.{module}.lora_B.weight"]
        np.testing.assert_allclose(lora_b @ lora_a, (alpha / rank) * peft_b @ peft_a, rtol=1e-5, atol=1e-7)
    assert config["rank_pattern"] == {"value": 2}
    assert not any(k.startswith("pooler") for k in state)
    model.set_adapter("attn")
    assert set(model.get_adapter_state_dict()) == {k for k in model.get_adapter_state_dict("attn")}


def test_load_adapter_from_file_and_from_peft_folder(model, tmp_path):
    copy = tmp_path / "ffn-copy.onnx_adapter"
    shutil.copy(switchable_export() / "adapters" / "ffn.onnx_adapter", copy)
    model.load_adapter(copy, adapter_name="from-file")
    assert model.active_adapters() == ["from-file"]  # loading activates, as in transformers
    model.load_adapter(str(make_adapter("mixed")), adapter_name="from-peft")  # converted on the fly (needs torch)
    expected = st_references()
    assert max_unit_diff(model.encode(TEXTS, adapter="from-file"), expected["ffn"]) <= SENTENCE_ATOL
    assert max_unit_diff(model.encode(TEXTS, adapter="from-peft"), expected["mixed"]) <= SENTENCE_ATOL
    with pytest.raises(ConfigError, match="Adapter with name 'from-file' already exists"):
        model.load_adapter(copy, adapter_name="from-file")
    with pytest.raises(ConfigError, match="letters, digits"):
        model.load_adapter(copy, adapter_name="../evil")
    assert model.list_adapters()[-2:] == ["from-file", "from-peft"]


def test_load_adapter_refuses_adapters_the_graph_cannot_run(tmp_path):
    attn_only = EmbeddingModel(switchable_export("attn-only", ("attn",)))
    with pytest.raises(ConfigError, match="has no LoRA branch in this switchable graph .*Re-export with this adapter"):
        attn_only.load_adapter(str(make_adapter("ffn")), adapter_name="ffn")
    with pytest.raises(ConfigError, match="is not a LoRA input of this graph"):
        attn_only.load_adapter(switchable_export() / "adapters" / "ffn.onnx_adapter", adapter_name="ffn")
    garbage = tmp_path / "garbage.onnx_adapter"
    garbage.write_bytes(b"not an adapter" * 64)
    with pytest.raises(ConfigError, match="not a valid ONNX Runtime adapter file"):
        attn_only.load_adapter(garbage, adapter_name="g")
    assert attn_only.list_adapters() == ["attn"]


def adapter_file(path, arrays):
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    adapter.export_adapter(str(path))
    return path


@pytest.mark.parametrize("mutate, message", TAMPERED_ADAPTERS)
def test_adapter_files_are_checked_against_the_graph(model, tmp_path, mutate, message):
    arrays = model.backend.read_adapter(switchable_export() / "adapters" / "attn.onnx_adapter")
    mutate(arrays)
    with pytest.raises(ConfigError, match=message):
        model.load_adapter(adapter_file(tmp_path / "bad.onnx_adapter", arrays), adapter_name="bad")
    assert "bad" not in model.list_adapters()


def _edit_manifest_entry(folder, name, **changes):
    manifest = json.loads((folder / "peft_export.json").read_text())
    next(e for e in manifest["adapters"] if e["name"] == name).update(changes)
    (folder / "peft_export.json").write_text(json.dumps(manifest))


def test_bad_adapter_files_in_an_export_are_refused_at_load(tmp_path):
    corrupt = copy_export(switchable_export(), tmp_path / "corrupt")
    (corrupt / "adapters" / "attn.onnx_adapter").write_bytes(b"\0" * 100)
    with pytest.raises(ConfigError, match="attn.onnx_adapter does not hold what peft_export.json records for "
                                          "adapter 'attn': sha256"):
        EmbeddingModel(corrupt)
    _edit_manifest_entry(corrupt, "attn", file_sha256=hashlib.sha256(b"\0" * 100).hexdigest())
    with pytest.raises(ConfigError, match="attn.onnx_adapter is not a valid ONNX Runtime adapter file"):
        EmbeddingModel(corrupt)
    escaping = copy_export(switchable_export(), tmp_path / "escaping")
    _edit_manifest_entry(escaping, "attn", file="../corrupt/adapters/ffn.onnx_adapter")
    with pytest.raises(UnsafeModelError, match="points outside the export folder"):
        EmbeddingModel(escaping)
    swapped = copy_export(switchable_export("attn-only", ("attn",)), tmp_path / "swapped")
    source = switchable_export() / "adapters" / "ffn.onnx_adapter"
    shutil.copy(source, swapped / "adapters" / "attn.onnx_adapter")
    with pytest.raises(ConfigError, match="does not hold what peft_export.json records"):
        EmbeddingModel(swapped)
    _edit_manifest_entry(swapped, "attn", file_sha256=hashlib.sha256(source.read_bytes()).hexdigest())
    with pytest.raises(ConfigError, match="is not a LoRA input of this graph"):
        EmbeddingModel(swapped)


def test_merged_exports_refuse_adapter_methods():
    merged = EmbeddingModel(merged_export("attn"))
    assert merged.list_adapters() == [] and not merged.is_switchable
    for call in (lambda: merged.set_adapter("attn"), merged.active_adapters, merged.disable_adapters,
                 lambda: merged.load_adapter("x"), lambda: merged.encode(TEXTS, adapter="attn"),
                 merged.get_adapter_state_dict):
        with pytest.raises(ConfigError, match="is a merged export \\(adapter 'default' merged into its weights\\)"):
            call()
    assert merged.encode(TEXTS).shape == (len(TEXTS), 32)


def test_concurrent_calls_never_see_each_others_adapter(model):
    assert concurrent_adapter_errors(model, TEXTS, ADAPTERS, threads=8, calls=25) == []


def test_switching_adapters_imports_no_torch():
    code = (
        "import sys; from peft_export import EmbeddingModel\n"
        f"m = EmbeddingModel({str(switchable_export())!r})\n"
        "m.set_adapter('ffn'); m.encode(['a b c']); m.encode(['x'], adapter='attn')\n"
        "m.get_adapter_state_dict('mixed')\n"
        "print(sorted(k for k in ('torch', 'transformers', 'peft') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent)
    assert out.stdout.strip() == "[]"
