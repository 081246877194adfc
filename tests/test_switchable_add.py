"""peft-export add-adapter / remove-adapter: an adapter added later is validated like an exported one and never
touches the graph; every refusal leaves the export folder byte-for-byte unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from fixtures.export_edits import uncovered
from switchable_fixtures import (TEXTS, base_model, copy_export, edit_adapter_config, make_adapter, max_unit_diff,
                                 merged_export, quiet, snapshot, switchable_export)

from peft_export import AdapterNotFoundError, ConfigError, EmbeddingModel, UnsafeModelError, ValidationError
from peft_export.cli import main as cli_main
from peft_export.export.switchable_changes import add_adapter
from peft_export.export.switchable_folder import remove_adapter

SENTENCE_ATOL = 1e-5
LATE = dict(r=3, lora_alpha=6, target_modules=["query", "dense"])


def _st_with(adapter_folder):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(base_model()), device="cpu")
    model.load_adapter(str(adapter_folder), adapter_name="x")
    model.set_adapter("x")
    return model.encode(TEXTS)


@pytest.fixture
def export(tmp_path):
    return copy_export(switchable_export(), tmp_path / "export")


@pytest.fixture
def attn_only(tmp_path):
    return copy_export(switchable_export("attn-only", ("attn",)), tmp_path / "attn-only")


def test_add_then_remove_keeps_the_graph_untouched(export, capsys):
    late = make_adapter("late", **LATE)
    graph_before = hashlib.sha256((export / "model.onnx").read_bytes()).hexdigest()
    assert cli_main(["add-adapter", str(export), f"late={late}"]) == 0
    assert "added adapter 'late'" in capsys.readouterr().out
    model = EmbeddingModel(export)
    assert model.list_adapters() == ["attn", "ffn", "mixed", "late"]
    assert max_unit_diff(model.encode(TEXTS, adapter="late"), _st_with(late)) <= SENTENCE_ATOL
    manifest = json.loads((export / "peft_export.json").read_text())
    entry = manifest["adapters"][-1]
    assert entry["name"] == "late" and entry["r"] == 3 and entry["validation"]["vs_merged_pytorch"][
        "sentence_embedding"] <= SENTENCE_ATOL
    assert entry["sha256"]["adapter_model.safetensors"] == hashlib.sha256(
        (late / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert any("late" in pair for pair in manifest["validation"]["adapter_pair_max_abs_diff"])
    assert uncovered(export) == []  # the new adapter file is hashed; nothing else changed

    assert cli_main(["remove-adapter", str(export), "ffn"]) == 0
    assert not (export / "adapters" / "ffn.onnx_adapter").exists()
    assert EmbeddingModel(export).list_adapters() == ["attn", "mixed", "late"]
    assert [a["name"] for a in json.loads((export / "peft_export.json").read_text())["adapters"]] == [
        "attn", "mixed", "late"]
    assert hashlib.sha256((export / "model.onnx").read_bytes()).hexdigest() == graph_before
    assert uncovered(export) == []
    with pytest.raises(AdapterNotFoundError, match="has no adapter named 'ffn'"):
        remove_adapter(export, "ffn", log=quiet)


def test_removing_the_default_adapter_clears_it(tmp_path):
    folder = tmp_path / "with-default"
    from peft_export import export_onnx_model

    export_onnx_model(str(base_model()), folder, adapters=[f"attn={make_adapter('attn')}"], switchable=True,
                      default_adapter="attn", log=quiet)
    remove_adapter(folder, "attn", log=quiet)
    model = EmbeddingModel(folder)
    assert model.list_adapters() == [] and model.active_adapters() == []
    assert json.loads((folder / "peft_export.json").read_text())["default_adapter"] is None


def _refused(folder, spec, error, match, **kwargs):
    before = snapshot(folder)
    with pytest.raises(error, match=match):
        add_adapter(folder, spec, log=quiet, **kwargs)
    assert snapshot(folder) == before


def test_adapter_for_a_different_base_is_refused(export):
    other_base = base_model("wide", hidden=48, seed=3)
    foreign = make_adapter("foreign", base=other_base, r=2, lora_alpha=4, target_modules=["query"])
    _refused(export, f"foreign={foreign}", ConfigError, "was this adapter trained on another base")


def test_same_shapes_but_another_base_fails_the_base_check(export):
    twin = base_model("twin", seed=7)  # same architecture, other weights: the export's base is not this one
    _refused(export, f"late={make_adapter('late', **LATE)}", ValidationError,
             "without an adapter.*pass that model as base=", base=str(twin))


def test_target_without_a_branch_says_to_reexport(attn_only):
    _refused(attn_only, f"ffn={make_adapter('ffn')}", ConfigError,
             "'encoder.layer.0.intermediate.dense' .*has no LoRA branch.*Re-export with this adapter")


def test_corrupt_and_pickle_weights_are_refused(export, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(make_adapter("attn"), corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _refused(export, f"corrupt={corrupt}", ConfigError, "is not a valid safetensors file")
    pickled = tmp_path / "pickled"
    shutil.copytree(make_adapter("attn"), pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    _refused(export, f"pickled={pickled}", UnsafeModelError, "safetensors only")


def test_other_refusals_leave_the_folder_unchanged(export, tmp_path):
    _refused(export, f"attn={make_adapter('late', **LATE)}", ConfigError, "already has an adapter named 'attn'")
    _refused(export, f"dora={edit_adapter_config(make_adapter('attn'), tmp_path / 'dora', use_dora=True)}",
             ConfigError, "lora_magnitude_vector is missing")  # the config claims DoRA, the file is plain LoRA
    noop = make_adapter("noop", zero_b=True, r=2, lora_alpha=4, target_modules=["query"])
    _refused(export, f"noop={noop}", ConfigError, "does nothing")
    _refused(export, f"again={make_adapter('attn')}", ValidationError, "'attn' give the same normalised embeddings")
    _refused(export, str(make_adapter("late", **LATE)), ConfigError, "Name the adapter")
    merged = copy_export(merged_export("attn"), tmp_path / "merged")
    _refused(merged, f"late={make_adapter('late', **LATE)}", ConfigError, "only be added to .* a switchable export")
