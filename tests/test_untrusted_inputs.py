"""Untrusted models and adapters (RELIABILITY items 9-15): pickle weights, foreign module classes, bad adapter
configs and tensors, adapters for another base, ONNX external data outside the folder, unreachable hub ids."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SENTENCE_ATOL, max_unit_diff
from fixtures import tiny_models
from peft_export import (
    ConfigError,
    EmbeddingModel,
    ModelNotFoundError,
    UnsafeModelError,
    export_onnx_model,
)


def _quiet(msg: str) -> None:
    return None


def _export(model_id, out: Path, **options):
    return export_onnx_model(str(model_id), out, log=_quiet, **options)


class _RunsCodeWhenUnpickled:
    """A pickle payload that creates a marker file if anything ever unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _write_malicious_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(marker)))


def _copy(folder: Path, tmp_path: Path, name: str) -> Path:
    return shutil.copytree(folder, tmp_path / name)


def _edit_adapter_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))  # json writes float('nan') as NaN, as a hand-edited file could hold


# ---- item 9: safetensors only ----

def test_pickle_only_adapter_is_refused_without_unpickling(bert_case, tmp_path):
    adapter = _copy(bert_case.adapter, tmp_path, "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    _write_malicious_pickle(adapter / "adapter_model.bin", marker)
    with pytest.raises(UnsafeModelError, match=r"only adapter_model\.bin \(a pickle.*safetensors"):
        _export(adapter, tmp_path / "out", base=str(bert_case.base))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_pickle_only_base_model_is_refused_without_unpickling(bert_case, tmp_path):
    base = _copy(bert_case.base, tmp_path, "base")
    (base / "model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    _write_malicious_pickle(base / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeModelError, match=r"only pickle weights \(pytorch_model\.bin\).*safetensors"):
        _export(bert_case.adapter, tmp_path / "out", base=str(base))
    assert not marker.exists()


# ---- item 10: no foreign code ----

def _write_marker_module(folder: Path, name: str, marker: Path) -> None:
    (folder / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Pooling:\n    pass\n", encoding="utf-8"
    )


def test_foreign_module_class_is_refused_without_importing_it(bert_case, tmp_path, monkeypatch):
    module_name = "peft_export_test_foreign_module"
    marker = tmp_path / "IMPORTED"
    _write_marker_module(tmp_path, module_name, marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = _copy(bert_case.base, tmp_path, "base")
    modules = json.loads((base / "modules.json").read_text())
    modules[1]["type"] = f"{module_name}.Pooling"
    (base / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsafeModelError, match=rf"module type '{module_name}\.Pooling'.*never imported"):
        _export(base, tmp_path / "out")
    assert module_name not in sys.modules
    assert not marker.exists()


def test_unsupported_sentence_transformers_module_is_refused(bert_case, tmp_path):
    base = _copy(bert_case.base, tmp_path, "base")
    modules = json.loads((base / "modules.json").read_text())
    modules[1]["type"] = "sentence_transformers.models.WeightedLayerPooling"
    (base / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError,
                       match=r"'sentence_transformers\.models\.WeightedLayerPooling'; peft_export supports"):
        _export(base, tmp_path / "out")


def test_module_path_outside_the_folder_is_refused(bert_case, tmp_path):
    base = _copy(bert_case.base, tmp_path, "base")
    shutil.copytree(base / "1_Pooling", tmp_path / "elsewhere")
    modules = json.loads((base / "modules.json").read_text())
    modules[1]["path"] = "../elsewhere"
    (base / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsafeModelError, match=r"module path '\.\./elsewhere' points outside the model folder"):
        _export(base, tmp_path / "out")


def test_dense_activation_outside_torch_is_refused(zoo, tmp_path):
    from torch import nn

    base = _copy(zoo.st("dense-act", "bert", dense=[(16, nn.Tanh())]), tmp_path, "base")
    config_path = base / "2_Dense" / "config.json"
    config = json.loads(config_path.read_text())
    config["activation_function"] = "os.system"
    config_path.write_text(json.dumps(config))
    with pytest.raises(UnsafeModelError, match=r"activation_function 'os\.system' is not one of the supported"):
        _export(base, tmp_path / "out")


def test_remote_code_in_config_is_not_run(zoo, tmp_path):
    """A config.json with auto_map: without trust_remote_code the custom module is never imported."""
    hf = _copy(zoo.hf("bert"), tmp_path, "hf")
    marker = tmp_path / "IMPORTED"
    _write_marker_module(hf, "modeling_evil", marker)
    config = json.loads((hf / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (hf / "config.json").write_text(json.dumps(config))
    # A known model_type loads transformers' own class and ignores the custom code ...
    EmbeddingModel(_export(hf, tmp_path / "out").path)
    assert not marker.exists()
    # ... an unknown one is refused, saying how to opt in.
    config["model_type"] = "evil-bert"
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"needs custom code \(trust_remote_code\).*pass trust_remote_code=True only"):
        _export(hf, tmp_path / "out2")
    assert not marker.exists()


# ---- item 11: adapter_config.json ----

BAD_CONFIGS = [
    ({"peft_type": "NOT_A_TUNER"}, ConfigError, r"peft_type is 'NOT_A_TUNER'; peft_export supports LORA, ADALORA, "),
    ({"r": 0}, ConfigError, r"'r' must be an integer in 1\.\.4096, found 0"),
    ({"r": -4}, ConfigError, r"'r' must be an integer in 1\.\.4096, found -4"),
    ({"r": 10**7}, ConfigError, r"'r' must be an integer in 1\.\.4096, found 10000000"),
    ({"r": "8"}, ConfigError, r"'r' must be an integer in 1\.\.4096, found '8'"),
    ({"lora_alpha": math.nan}, ConfigError, r"'lora_alpha' must be a finite number, found nan"),
    ({"lora_alpha": math.inf}, ConfigError, r"'lora_alpha' must be a finite number, found inf"),
    ({"auto_mapping": {"base_model_class": "Evil", "parent_library": "evil_package.models"}}, UnsafeModelError,
     r"'auto_mapping' is .*evil_package.*refused"),
    ({"megatron_core": "evil.megatron"}, UnsafeModelError, r"'megatron_config'/'megatron_core' would import"),
    ({"megatron_config": {"tensor_model_parallel_size": 2}}, UnsafeModelError, r"'megatron_config'/'megatron_core'"),
    ({"trust_remote_code": True}, UnsafeModelError, r"'trust_remote_code' is set inside the adapter config"),
    ({"target_modules": []}, ConfigError, r"'target_modules' must be a non-empty list"),
    ({"alpha_pattern": {"query": math.nan}}, ConfigError, r"alpha_pattern\['query'\] must be a positive finite"),
    ({"rank_pattern": {"query": 0}}, ConfigError, r"rank_pattern\['query'\] must be a positive finite"),
    ({"layer_replication": [[0, 1], [0, 1]]}, ConfigError, r"'layer_replication' is set"),
    # DoRA is exported merged (issue 26), but not a LoRA file whose config was edited to claim it
    ({"use_dora": True}, ConfigError, r"tensor \S+\.lora_magnitude_vector is missing: target_modules"),
]


@pytest.mark.parametrize("changes, error, message", BAD_CONFIGS, ids=[next(iter(c[0])) + "-" + str(i)
                                                                       for i, c in enumerate(BAD_CONFIGS)])
def test_bad_adapter_config_is_refused_naming_the_key(bert_case, tmp_path, changes, error, message):
    adapter = _copy(bert_case.adapter, tmp_path, "adapter")
    _edit_adapter_config(adapter, **changes)
    with pytest.raises(error, match=message):
        _export(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_adapter_config_is_refused_before_peft_or_transformers_are_imported(bert_case, tmp_path):
    adapter = _copy(bert_case.adapter, tmp_path, "adapter")
    _edit_adapter_config(adapter, auto_mapping={"base_model_class": "X", "parent_library": "evil_package"})
    script = (
        "import sys\n"
        "from peft_export.cli import main\n"
        f"code = main(['merge-onnx', {str(adapter)!r}, '-o', {str(tmp_path / 'out')!r}])\n"
        "print('exit', code, sorted(m for m in ('peft', 'transformers', 'evil_package') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "exit 2 []", result.stderr
    assert "auto_mapping" in result.stderr


def test_plain_peft_auto_mapping_is_accepted(zoo):
    """get_peft_model() on a bare transformers model writes a harmless auto_mapping; it must not be refused."""
    adapter = zoo.peft_adapter("plain-bert", zoo.hf("bert"), "bert")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["auto_mapping"]["parent_library"].startswith("transformers.")
    from peft_export.source.adapter_config import read_adapter_config

    assert read_adapter_config(adapter).r == 4


def test_target_modules_matching_nothing_are_refused(bert_case, tmp_path):
    adapter = _copy(bert_case.adapter, tmp_path, "adapter")
    _edit_adapter_config(adapter, target_modules=["no_such_module"])
    with pytest.raises(ConfigError, match=r"target_modules \['no_such_module'\] match no module of the base model"):
        _export(adapter, tmp_path / "out")


# ---- item 12: adapter tensors ----

def _edit_tensors(folder: Path, edit) -> str:
    """Apply ``edit(dict) -> key`` to the adapter's tensors; returns the key the edit touched."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = edit(tensors)
    save_file(tensors, str(path))
    return key


def _first(tensors: dict, part: str) -> str:
    return sorted(k for k in tensors if f".{part}." in k)[0]


def _wrong_shape(t):
    import torch

    key = _first(t, "lora_A")
    t[key] = torch.randn(t[key].shape[0], t[key].shape[1] + 3)
    return key


def _int_dtype(t):
    key = _first(t, "lora_B")
    t[key] = t[key].to(__import__("torch").int32)
    return key


def _nan_value(t):
    key = _first(t, "lora_B")
    t[key][0, 0] = float("nan")
    return key


def _inf_value(t):
    key = _first(t, "lora_A")
    t[key][0, 0] = float("inf")
    return key


def _missing_module(t):
    key = "base_model.model.encoder.layer.9.attention.self.query.lora_A.weight"
    t[key] = t[_first(t, "lora_A")].clone()
    return key


def _not_lora(t):
    key = "base_model.model.classifier.weight"
    t[key] = t[_first(t, "lora_A")].clone()
    return key


BAD_TENSORS = [
    (_wrong_shape, r"has shape \(4, 35\) but the base layer takes 32 inputs"),
    (_int_dtype, r"has dtype torch\.int32, expected a float type"),
    (_nan_value, r"contains NaN or Inf values"),
    (_inf_value, r"contains NaN or Inf values"),
    (_missing_module, r"targets module 'encoder\.layer\.9\.attention\.self\.query', which the base model"),
    (_not_lora, r"is not a LoRA weight"),
]


@pytest.mark.parametrize("edit, message", BAD_TENSORS, ids=[e.__name__.strip("_") for e, _ in BAD_TENSORS])
def test_bad_adapter_tensors_are_refused_naming_the_key(bert_case, tmp_path, edit, message):
    import re

    adapter = _copy(bert_case.adapter, tmp_path, "adapter")
    key = _edit_tensors(adapter, edit)
    with pytest.raises(ConfigError, match=message) as info:
        _export(adapter, tmp_path / "out")
    assert repr(key) in str(info.value) or re.escape(key) in str(info.value)
    assert not (tmp_path / "out").exists()


# ---- item 13: adapter for another base; exact variants ----

def test_adapter_for_a_base_with_another_hidden_size_is_refused(zoo, bert_case, tmp_path):
    other_hf = tiny_models.build_hf_encoder("bert", tmp_path / "hf48", zoo.tokenizer_texts, hidden=48)
    other_base = tiny_models.build_st_model(other_hf, tmp_path / "st48")
    with pytest.raises(ConfigError,
                       match=r"but the base layer takes 48 inputs; was this adapter trained on another base"):
        _export(bert_case.adapter, tmp_path / "out", base=str(other_base))


def test_adapter_for_another_architecture_is_refused(distilbert_case, bert_case, tmp_path):
    with pytest.raises(ConfigError, match=r"match no module of the base model \(BertModel, model_type 'bert'\)"):
        _export(distilbert_case.adapter, tmp_path / "out", base=str(bert_case.base))


@pytest.mark.parametrize("name, adapter_kwargs", [
    ("rslora", {"use_rslora": True}),
    ("patterns", {"rank_pattern": {"query": 2}, "alpha_pattern": {"value": 24}}),
])
def test_rslora_and_rank_alpha_patterns_are_exported_exactly(zoo, real_texts, name, adapter_kwargs):
    case = zoo.case(name, "bert", adapter_kwargs=adapter_kwargs)
    texts = real_texts[:30]
    expected = case.reference().encode(texts)
    assert max_unit_diff(case.embedding_model().encode(texts), expected) < SENTENCE_ATOL
    # The option matters: the same tensors read as plain LoRA give other embeddings.
    plain = zoo.case("bert", "bert").reference().encode(texts)
    assert max_unit_diff(expected, plain) > 1e-3


# ---- item 14: ONNX external data ----

def _point_external_data(export: Path, location: str, data_file: Path) -> None:
    """Rewrite the graph so its largest initializer lives in external data at ``location``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(export / "model.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data_file.write_bytes(numpy_helper.to_array(tensor).tobytes())
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(data_file.stat().st_size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (export / "model.onnx").write_bytes(model.SerializeToString())
    # As an attacker would, record the new graph's hash too: the path check below is what must refuse it.
    manifest = json.loads((export / "peft_export.json").read_text())
    manifest["export"]["sha256"]["model.onnx"] = hashlib.sha256((export / "model.onnx").read_bytes()).hexdigest()
    (export / "peft_export.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(bert_case, tmp_path, kind):
    export = _copy(bert_case.export, tmp_path, "export")
    outside = tmp_path / "outside.bin"
    if kind == "parent":
        _point_external_data(export, "../outside.bin", outside)
    elif kind == "absolute":
        _point_external_data(export, str(outside), outside)
    else:  # a real model.onnx whose data is a symlink elsewhere (ONNX Runtime refuses; a hub snapshot, where
        # both are symlinks into one blobs/ folder, loads: tests/test_export_integrity.py)
        _point_external_data(export, "weights.bin", outside)
        os.symlink(outside, export / "weights.bin")
    with pytest.raises(UnsafeModelError, match=r"points to external data .* outside the model folder; refused"):
        EmbeddingModel(export)


def test_external_data_inside_the_folder_loads(bert_case, bert_model, tmp_path):
    export = _copy(bert_case.export, tmp_path, "export")
    _point_external_data(export, "model.onnx_data", export / "model.onnx_data")
    moved = shutil.move(str(export), str(tmp_path / "moved"))
    np.testing.assert_allclose(EmbeddingModel(moved).encode(["moved folder"]), bert_model.encode(["moved folder"]),
                               atol=1e-6)


# ---- item 15: unreachable hub id ----

def test_offline_hub_id_names_the_id_and_suggests_a_local_folder(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    with pytest.raises(ModelNotFoundError, match=r"'peft-export-tests/no-such-model'.*pass the local folder"):
        _export("peft-export-tests/no-such-model", tmp_path / "out")


def test_offline_hub_id_from_the_cli(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run(
        [sys.executable, "-m", "peft_export.cli", "merge-onnx", "peft-export-tests/no-such-model", "-o",
         str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peft-export: error: ")
    assert "'peft-export-tests/no-such-model'" in lines[0] and "local folder" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"No folder at .*not a Hugging Face Hub id"):
        _export(str(tmp_path / "no" / "such" / "folder"), tmp_path / "out")
