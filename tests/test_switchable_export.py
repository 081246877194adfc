"""merge-onnx --switchable on a tiny BERT with three adapters (different ranks, alphas, target sets; non-zero):
every adapter through the one graph equals sentence-transformers with that adapter, and its merged export, in
every switch order; no adapter equals the base export; the artifacts say what they hold."""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pytest
from switchable_fixtures import (ADAPTERS, ROOT, TEXTS, base_model, check_switch_order, edit_adapter_config,
                                 make_adapter, max_unit_diff, merged_export, quiet, st_references, switchable_export)

from peft_export import ConfigError, EmbeddingModel, export_onnx_model
from peft_export.cli import main as cli_main

SENTENCE_ATOL = 1e-5
BASE_ATOL = 1e-6


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel(switchable_export())


def test_folder_holds_one_graph_and_one_file_per_adapter():
    folder = switchable_export()
    config = json.loads((folder / "embedding_config.json").read_text())
    manifest = json.loads((folder / "peft_export.json").read_text())
    assert sorted(p.name for p in (folder / "adapters").iterdir()) == [f"{n}.onnx_adapter" for n in sorted(ADAPTERS)]
    assert list((folder).glob("*.onnx")) == [folder / "model.onnx"]
    assert manifest["merge_mode"] == "switchable" and manifest["default_adapter"] is None
    assert "adapters" not in config  # the manifest alone lists the adapters (one rename changes the set)
    slots = {slot["module"] for slot in config["lora_slots"]}
    assert not any(s.startswith("pooler") for s in slots)  # 'dense' hits BERT's pooler, which no embedding reads
    assert "encoder.layer.1.attention.self.key" in slots and "encoder.layer.0.intermediate.dense" in slots
    for entry in manifest["adapters"]:
        source = make_adapter(entry["name"]) / "adapter_model.safetensors"
        assert entry["sha256"] == {"adapter_model.safetensors": hashlib.sha256(source.read_bytes()).hexdigest()}
        assert entry["r"] == ADAPTERS[entry["name"]]["r"]
        assert entry["lora_alpha"] == ADAPTERS[entry["name"]]["lora_alpha"]
        assert entry["file_sha256"] == hashlib.sha256((folder / entry["file"]).read_bytes()).hexdigest()
        assert entry["validation"]["vs_eager_peft"]["max_abs_diff"]["sentence_embedding"] <= SENTENCE_ATOL
        assert entry["validation"]["vs_merged_pytorch"]["sentence_embedding"] <= SENTENCE_ATOL
        assert entry["validation"]["adapter_vs_base_max_abs_diff"] > 1e-3
    assert manifest["validation"]["no_adapter_vs_base"]["max_abs_diff"]["sentence_embedding"] <= BASE_ATOL
    assert len(manifest["validation"]["adapter_pair_max_abs_diff"]) == 3
    # rank_pattern / alpha_pattern are taken per module: 'value' has rank 2 in the mixed adapter, 'query' rank 4
    mixed = next(entry for entry in manifest["adapters"] if entry["name"] == "mixed")
    ranks = mixed["ranks"]
    assert ranks["encoder.layer.0.attention.self.value"] == 2 and ranks["encoder.layer.0.attention.self.query"] == 4
    assert not any("key" in m for m in mixed["modules"])


def test_rank_zero_defaults_broadcast_a_column_instead_of_writing_a_block():
    import onnx
    from onnx import numpy_helper

    folder = switchable_export()
    graph = onnx.load(str(folder / "model.onnx")).graph
    slots = json.loads((folder / "embedding_config.json").read_text())["lora_slots"]
    defaults = {t.name: numpy_helper.to_array(t).shape for t in graph.initializer if ".lora_" in t.name}
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    for slot in slots:
        a, b = f"{slot['module']}.lora_A", f"{slot['module']}.lora_B"
        assert defaults[a] == (slot["in_features"], 0) and defaults[b] == (0, 1)
        assert isinstance(inputs[b][1], str)  # out axis dynamic, so that (0, 1) and (rank, out) both fit


def test_fresh_switchable_export_runs_as_the_base(model):
    assert model.active_adapters() == [] and model.list_adapters() == list(ADAPTERS)
    base_export = EmbeddingModel(merged_export(None))
    assert max_unit_diff(model.encode(TEXTS), base_export.encode(TEXTS)) <= BASE_ATOL
    assert max_unit_diff(model.encode(TEXTS), st_references()[None]) <= SENTENCE_ATOL


@pytest.mark.parametrize("order", list(itertools.permutations([*ADAPTERS, None])))
def test_every_switch_order_matches_sentence_transformers(model, order):
    check_switch_order(model, order, SENTENCE_ATOL)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_each_adapter_equals_its_merged_export(model, name):
    merged = EmbeddingModel(merged_export(name)).encode(TEXTS)
    assert max_unit_diff(model.encode(TEXTS, adapter=name), merged) <= SENTENCE_ATOL


def test_adapters_differ_from_each_other_and_from_the_base(model):
    outputs = {name: model.encode(TEXTS, adapter=name) for name in ADAPTERS}
    outputs[None] = model.encode(TEXTS, adapter=False)
    for a, b in itertools.combinations(outputs, 2):
        assert max_unit_diff(outputs[a], outputs[b]) > 1e-3, (a, b)


def test_graph_runs_on_untraced_shapes(model):
    for batch in (1, 2, 7):
        texts = (TEXTS * 2)[:batch]
        assert model.encode(texts, adapter="mixed").shape == (batch, 32)
    long = model.encode([TEXTS[6]], adapter="ffn")  # truncated to max_seq_length 48
    assert np.isfinite(long).all()


def test_cli_default_adapter_is_active_when_loaded(tmp_path, capsys):
    out = tmp_path / "default"
    code = cli_main(["merge-onnx", str(base_model()), "--adapter", f"ffn={make_adapter('ffn')}",
                     "--adapter", f"attn={make_adapter('attn')}", "--switchable", "--default-adapter", "ffn",
                     "-o", str(out)])
    assert code == 0 and "done:" in capsys.readouterr().out
    model = EmbeddingModel(out)
    assert model.active_adapters() == ["ffn"]
    assert max_unit_diff(model.encode(TEXTS), st_references()["ffn"]) <= SENTENCE_ATOL
    assert cli_main(["info", str(out)]) == 0
    assert "default adapter: ffn" in capsys.readouterr().out
    assert cli_main(["encode", str(out), TEXTS[1], TEXTS[2], "--adapter", "attn", "--json"]) == 0
    printed = np.array(json.loads(capsys.readouterr().out))
    assert max_unit_diff(printed, st_references()["attn"][1:3]) <= SENTENCE_ATOL


@pytest.mark.parametrize("change, key", [
    ({"use_dora": True}, "lora_magnitude_vector is missing"),  # DoRA is switchable; this file is plain LoRA
    ({"lora_bias": True}, "lora_bias"),
    ({"bias": "all"}, "'bias'"),
    ({"modules_to_save": ["pooler"]}, "modules_to_save"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
])
def test_configs_the_graph_cannot_express_are_refused(tmp_path, change, key):
    adapter = edit_adapter_config(make_adapter("attn"), tmp_path / "edited", **change)
    with pytest.raises(ConfigError, match=key):
        export_onnx_model(str(base_model()), tmp_path / "out", adapters=[f"x={adapter}"], switchable=True, log=quiet)
    assert not (tmp_path / "out").exists()


def test_option_errors(tmp_path):
    attn, ffn = make_adapter("attn"), make_adapter("ffn")
    with pytest.raises(ConfigError, match="^default_adapter='nope' is not one of"):
        export_onnx_model(str(base_model()), tmp_path / "a", adapters=[f"attn={attn}"], switchable=True,
                          default_adapter="nope", log=quiet)
    with pytest.raises(ConfigError, match="pass switchable=True"):
        export_onnx_model(str(base_model()), tmp_path / "b", adapters=[f"attn={attn}", f"ffn={ffn}"], log=quiet)
    with pytest.raises(ConfigError, match="at least one adapter"):
        export_onnx_model(str(base_model()), tmp_path / "c", switchable=True, log=quiet)
    assert not any(tmp_path.iterdir())
    assert ROOT.exists()
