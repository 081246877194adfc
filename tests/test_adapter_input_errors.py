"""Adapter and model inputs that used to get through or fail with a raw third-party error (issue 18 items 4 and 7;
issue 16's nomic_bert edge): each is now one peft-export error naming the file, key or input index, exit 2 from
the CLI, nothing written."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from peft_export import ConfigError, EmbeddingModel, InvalidInputError, ValidationError, export_onnx_model
from peft_export.cli import main as cli_main


def _quiet(msg: str) -> None:
    return None


def _adapter_copy(source: Path, tmp_path: Path, **config_changes) -> Path:
    folder = shutil.copytree(source, tmp_path / "adapter")
    if config_changes:
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(config_changes)
        path.write_text(json.dumps(config))
    return folder


def _drop_tensors(folder: Path, *fragments: str) -> list[str]:
    """Delete the adapter tensors whose key contains any of ``fragments``; returns the deleted keys, sorted."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    dropped = sorted(k for k in tensors if any(f in k for f in fragments))
    for key in dropped:
        del tensors[key]
    save_file(tensors, str(path))
    return dropped


def _cli_export(capsys, adapter: Path, out: Path, *extra: str) -> str:
    code = cli_main(["merge-onnx", str(adapter), "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]  # third-party progress bars may come first on stderr
    assert "Traceback" not in err and last.startswith("peft-export: error: ")
    assert not out.exists()
    return last


# ---- issue 18 item 4: incomplete LoRA pairs ----

@pytest.mark.parametrize("switchable", [False, True], ids=["merged", "switchable"])
def test_adapter_with_a_module_pair_deleted_is_refused_naming_the_first_missing_key(bert_case, tmp_path, capsys,
                                                                                   switchable):
    adapter = _adapter_copy(bert_case.adapter, tmp_path)
    dropped = _drop_tensors(adapter, "layer.0.attention.self.query.")
    assert [k.rsplit(".", 2)[-2] for k in dropped] == ["lora_A", "lora_B"]
    extra = ["--switchable"] if switchable else []
    err = _cli_export(capsys, adapter, tmp_path / "out", *extra)
    assert f"adapter_model.safetensors: tensor {dropped[0]} is missing" in err
    assert "'encoder.layer.0.attention.self.query'" in err


def test_adapter_missing_one_lora_b_is_refused(bert_case, tmp_path):
    adapter = _adapter_copy(bert_case.adapter, tmp_path)
    dropped = _drop_tensors(adapter, "layer.1.attention.self.value.lora_B")
    assert len(dropped) == 1
    with pytest.raises(ConfigError, match=rf"tensor {dropped[0].replace('.', '[.]')} is missing"):
        export_onnx_model(str(adapter), tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists()


# ---- issue 18 item 7: raw errors become peft-export errors ----

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _huge_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**12) + data[8:])  # header length field: 1 TB


@pytest.mark.parametrize("damage, detail", [
    (_truncate, r"tensor '[^']+' lies outside the file's \d+ data bytes \(truncated\?\)"),
    (_huge_header, r"its header claims 1000000000000 bytes but the file has \d+"),
], ids=["truncated", "huge-header"])
def test_unreadable_adapter_safetensors_is_one_error_naming_the_file(bert_case, tmp_path, capsys, damage, detail):
    adapter = _adapter_copy(bert_case.adapter, tmp_path)
    damage(adapter / "adapter_model.safetensors")
    err = _cli_export(capsys, adapter, tmp_path / "out")
    assert err.startswith(f"peft-export: error: {adapter / 'adapter_model.safetensors'}")
    assert re.search(detail, err), err
    assert "Re-download or re-save it with safetensors" in err


BAD_CONFIGS = [
    ({"target_modules": ".*"},
     r"target_modules '\.\*' match 'embeddings', a BertEmbeddings; LoRA is exported on Linear layers only\. "
     r"The Linear layers of BertModel, model_type 'bert' are named: dense, key, query, value"),
    ({"rank_pattern": {"query": 2}},
     r"'base_model\.model\.encoder\.layer\.0\.attention\.self\.query\.lora_A\.weight' has shape \(4, 32\), but "
     r"adapter_config\.json gives 'encoder\.layer\.0\.attention\.self\.query' rank rank_pattern\['query'\]=2"),
]


@pytest.mark.parametrize("changes, message", BAD_CONFIGS, ids=["all-modules-regex", "rank_pattern"])
@pytest.mark.parametrize("switchable", [False, True], ids=["merged", "switchable"])
def test_adapter_config_peft_would_fail_on_is_refused_naming_the_key(bert_case, tmp_path, changes, message,
                                                                      switchable):
    adapter = _adapter_copy(bert_case.adapter, tmp_path, **changes)
    options = {"adapters": [f"a={adapter}"], "switchable": True} if switchable else {}
    with pytest.raises(ConfigError, match=message):
        export_onnx_model(str(bert_case.base if switchable else adapter), tmp_path / "out", log=_quiet, **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("switchable", [False, True], ids=["merged", "switchable"])
def test_modules_to_save_without_its_tensors_is_refused(bert_case, tmp_path, switchable):
    """Merged exports take modules_to_save (issue 26) but not a config naming a module the file has no copy of
    (PEFT would keep the base's weights without a word), in either mode."""
    saved = "encoder.layer.1.output.dense"
    adapter = _adapter_copy(bert_case.adapter, tmp_path, modules_to_save=[saved])
    options = {"adapters": [f"a={adapter}"], "switchable": True} if switchable else {}
    message = (rf"tensor base_model\.model\.{saved}\.bias is missing: modules_to_save \['{saved}'\] stores a "
               rf"trained copy of '{saved}'")
    with pytest.raises(ConfigError, match=message):
        export_onnx_model(str(bert_case.base if switchable else adapter), tmp_path / "out", log=_quiet, **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("switchable", [False, True], ids=["merged", "switchable"])
def test_overflowing_lora_alpha_is_reported_as_non_finite(bert_case, tmp_path, switchable):
    """lora_alpha 1e30 used to be reported as "changes the embeddings by at most 0 (LoRA B still zero?)"."""
    adapter = _adapter_copy(bert_case.adapter, tmp_path, lora_alpha=1e30)
    options = {"adapters": [f"a={adapter}"], "switchable": True} if switchable else {}
    with pytest.raises(ValidationError, match=r"Adapter '(default|a)' produces non-finite values \(NaN/Inf\) in "
                                              r"sentence_embedding") as info:
        export_onnx_model(str(bert_case.base if switchable else adapter), tmp_path / "out", log=_quiet, **options)
    assert "LoRA B still zero" not in str(info.value)
    if not switchable:
        assert "lora_alpha / r = 1e+30 / 4" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_export_without_tokenizer_json_is_refused_naming_the_file(bert_case, tmp_path):
    export = shutil.copytree(bert_case.export, tmp_path / "export")
    (export / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=rf"{export / 'tokenizer.json'} not found"):
        EmbeddingModel(export)


def test_truncated_model_onnx_is_refused_naming_the_file(bert_case, tmp_path):
    export = shutil.copytree(bert_case.export, tmp_path / "export")
    _truncate(export / "model.onnx")
    with pytest.raises(ConfigError, match=r"model\.onnx .*truncated or corrupt"):
        EmbeddingModel(export)


def test_truncated_model_onnx_is_refused_by_onnx_runtime_without_the_onnx_package(bert_case, tmp_path, monkeypatch):
    """A serving-only install has no onnx package: ONNX Runtime's own parse error becomes the same clear error."""
    import peft_export.runtime.onnxruntime_backend as backend

    def no_onnx(path):
        raise ImportError("onnx")

    monkeypatch.setattr(backend, "check_external_data", no_onnx)
    export = shutil.copytree(bert_case.export, tmp_path / "export")
    _truncate(export / "model.onnx")
    with pytest.raises(ConfigError, match=r"ONNX Runtime cannot load .*model\.onnx: .*truncated or corrupt"):
        EmbeddingModel(export)


def test_lone_surrogate_in_encode_names_the_input_index(bert_model):
    with pytest.raises(InvalidInputError, match=r"sentences\[2\] is not valid Unicode: '\\ud800' at character 1"):
        bert_model.encode(["fine", "also fine", "a\ud800b"])
    with pytest.raises(ValueError, match=r"sentences\[0\]"):  # callers catching ValueError see it too
        bert_model.encode("\ud800")
    assert bert_model.encode(["fine"]).shape == (1, bert_model.get_sentence_embedding_dimension())


# ---- issue 16 item 6: an adapter for the remote-code nomic layout over transformers' built-in NomicBertModel ----

def test_adapter_whose_targets_match_nothing_names_both_sets(zoo, tmp_path):
    """transformers maps model_type nomic_bert to a built-in class with q_proj/k_proj/... names; an adapter trained
    on the remote-code model (Wqkv, out_proj, fc11, fc12, fc2) matches nothing there and must not export as a
    no-op."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, CONFIG_MAPPING

    hf = zoo.hf("bert")
    base = tmp_path / "nomic"
    config = CONFIG_MAPPING["nomic_bert"](vocab_size=json.loads((hf / "config.json").read_text())["vocab_size"],
                                          hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=37, max_position_embeddings=128)
    AutoModel.from_config(config).save_pretrained(str(base))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf / name, base / name)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    targets = ["Wqkv", "out_proj", "fc11", "fc12", "fc2"]
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets, "base_model_name_or_path": "x"}))
    tensors = {f"base_model.model.encoder.layers.0.attn.Wqkv.lora_{p}.weight": torch.ones(s)
               for p, s in (("A", (4, 32)), ("B", (96, 4)))}
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=r"target_modules \['Wqkv', 'out_proj', 'fc11', 'fc12', 'fc2'\] match no "
                                          r"module of the base model \(NomicBertModel, model_type 'nomic_bert'\), "
                                          r"whose Linear layers are named: down_proj, gate_proj, k_proj, o_proj, "
                                          r"q_proj, up_proj, v_proj"):
        export_onnx_model(str(adapter), tmp_path / "out", base=str(base), log=_quiet)
    assert not (tmp_path / "out").exists()


# ----- issue 22 item 12: adapter names are validated wherever they enter -----
LONG_NAME = "x" * 300


def test_add_adapter_with_a_300_character_name_is_one_line_exit_2(tmp_path, capsys):
    # It failed with an OSError traceback (File name too long) from checking whether NAME=PATH was a path.
    from switchable_fixtures import copy_export, make_adapter, snapshot, switchable_export

    export = copy_export(switchable_export(), tmp_path / "export")
    before, adapter = snapshot(export), make_adapter("attn")
    capsys.readouterr()  # what building the fixtures printed
    assert cli_main(["add-adapter", str(export), f"{LONG_NAME}={adapter}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "(300 characters) must be 1 to 64 characters of ASCII letters, digits, '-', '_' or '.'" in err
    assert snapshot(export) == before


@pytest.mark.parametrize("name", [LONG_NAME, "../x", "a b", ".hidden"])
def test_load_adapter_refuses_bad_names(name):
    from switchable_fixtures import make_adapter, switchable_export

    model = EmbeddingModel(switchable_export())
    with pytest.raises(ConfigError, match=r"must be 1 to 64 characters of ASCII letters, digits"):
        model.load_adapter(str(make_adapter("attn")), adapter_name=name)
    assert LONG_NAME not in model.list_adapters()


def test_server_answers_a_300_character_or_path_shaped_model_name_with_404_json():
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient
    from switchable_fixtures import switchable_export

    from peft_export.serve import create_app

    with TestClient(create_app(EmbeddingModel(switchable_export()))) as client:
        for name in (LONG_NAME, "../../etc/passwd", "attn/../ffn"):
            response = client.post("/v1/embeddings", json={"input": ["a"], "model": name})
            assert response.status_code == 404, response.text
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"]["code"] == "model_not_found"
            assert len(response.text) < 1000
