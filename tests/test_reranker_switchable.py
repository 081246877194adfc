"""Switchable reranker exports (issue 25): one CrossEncoder graph with LoRA branches on its encoder plus a weight
file per adapter, the base classification head shared. Each adapter selected per call equals eager CrossEncoder +
that PEFT adapter within 1e-5; no adapter equals the base within 1e-6; add-adapter, remove-adapter and the runtime's
merge_adapter work on it as on an embedding export."""

from __future__ import annotations

import json
import re
import shutil
import threading

import numpy as np
import pytest

import peft_export
from fixtures import tiny_models
from peft_export import AdapterNotFoundError, CrossEncoderModel, OutputExistsError
from peft_export.tasks.reranker import VALIDATION_PAIRS
import reranker_fixtures

TOLERANCE = 1e-5
BASE_TOLERANCE = 1e-6
QUERY = "How do I reset my password?"
PASSAGES = [
    "Open the settings page, choose Security and click 'Reset password'.",
    "Paris is the capital and most populous city of France.",
    "Hi",
    " ".join(["A passage far longer than the model's maximum sequence length, truncated with its query."] * 40),
    "Reset",
]
PAIRS = [(QUERY, p) for p in PASSAGES] + [tuple(p) for p in VALIDATION_PAIRS]


@pytest.fixture(scope="session")
def rerank_adapters(zoo, reranker):
    return reranker_fixtures.rerank_adapters(zoo, reranker)


@pytest.fixture(scope="session")
def switchable_reranker(zoo, reranker):
    return reranker_fixtures.switchable_reranker(zoo, reranker)


@pytest.fixture(scope="session")
def query_adapter(zoo, reranker):
    """A third adapter, on the query and value layers only (which a graph exported with "qv" has branches for)."""
    return zoo._once("ce-bert-lora-q", lambda: tiny_models.add_cross_encoder_adapter(
        reranker["base"], zoo.path("ce-bert-lora-q"), target_modules=("query", "value"), r=2, alpha=4, seed=3))


def _eager(reranker, adapter_folder=None):
    return tiny_models.cross_encoder_reference(reranker["base"], adapter_folder)


def test_switchable_export_records_the_reranker_task(switchable_reranker):
    manifest = json.loads((switchable_reranker / "peft_export.json").read_text())
    assert manifest["task"] == "reranker" and manifest["merge_mode"] == "switchable"
    assert [a["name"] for a in manifest["adapters"]] == ["qv", "qk"]
    assert set(manifest["validation"]["no_adapter_vs_base"]["max_abs_diff"]) == {"logits", "scores"}
    assert manifest["validation"]["no_adapter_vs_base"]["tolerances"]["logits"] == 1e-5  # the task's own
    for entry in manifest["adapters"]:
        assert max(entry["validation"]["vs_eager_peft"]["max_abs_diff"].values()) <= TOLERANCE
    config = json.loads((switchable_reranker / "reranker_config.json").read_text())
    assert config["task_config"] == {"num_labels": 1, "activation_fn": "sigmoid", "id2label": {"0": "LABEL_0"},
                                     "prompts": {},
                                     "default_prompt_name": None}
    assert config["output_names"] == ["logits", "scores"] and config["lora_slots"]
    assert not (switchable_reranker / "embedding_config.json").exists()


@pytest.mark.parametrize("name", ["qv", "qk"])
def test_each_adapter_per_call_equals_eager_cross_encoder_with_it(switchable_reranker, reranker, rerank_adapters,
                                                                  name):
    import torch

    model = peft_export.load(switchable_reranker)
    assert isinstance(model, CrossEncoderModel) and model.list_adapters() == ["qv", "qk"]
    eager = _eager(reranker, rerank_adapters[name])
    for batch_size in (1, 32):
        got = model.predict(PAIRS, batch_size=batch_size, adapter=name)
        assert np.abs(got - eager.predict(PAIRS, batch_size=batch_size)).max() <= TOLERANCE
        logits = model.predict(PAIRS, batch_size=batch_size, adapter=name, activation_fn="identity")
        want = eager.predict(PAIRS, batch_size=batch_size, activation_fn=torch.nn.Identity())
        assert np.abs(logits - want).max() <= TOLERANCE
    # rank() takes the adapter too, in sentence-transformers' result shape and order
    ranked = model.rank(QUERY, PASSAGES, adapter=name)
    assert [r["corpus_id"] for r in ranked] == [r["corpus_id"] for r in eager.rank(QUERY, PASSAGES)]


def test_no_adapter_is_the_base_and_the_adapters_differ(switchable_reranker, reranker):
    model = CrossEncoderModel(switchable_reranker)
    base = model.predict(PAIRS, activation_fn="identity")
    # The merged export of the base CrossEncoder, and eager sentence-transformers without an adapter.
    merged = CrossEncoderModel(reranker["base_export"]).predict(PAIRS, activation_fn="identity")
    assert np.abs(base - merged).max() <= BASE_TOLERANCE
    import torch

    eager = _eager(reranker).predict(PAIRS, activation_fn=torch.nn.Identity())
    assert np.abs(base - eager).max() <= TOLERANCE  # against torch: the issue's 1e-5 (1.2e-6 seen on logits near 2.3)
    qv, qk = (model.predict(PAIRS, adapter=n, activation_fn="identity") for n in ("qv", "qk"))
    assert np.abs(qv - base).max() > 1e-3 and np.abs(qk - base).max() > 1e-3 and np.abs(qv - qk).max() > 1e-3


def test_set_adapter_and_disable_follow_peft_semantics(switchable_reranker, reranker, rerank_adapters):
    model = CrossEncoderModel(switchable_reranker)
    model.set_adapter("qk")
    assert model.active_adapters() == ["qk"]
    eager = _eager(reranker, rerank_adapters["qk"]).predict(PAIRS)
    assert np.abs(model.predict(PAIRS) - eager).max() <= TOLERANCE
    # A per-call adapter wins over the active one, for that call only.
    assert np.abs(model.predict(PAIRS, adapter="qv") - _eager(reranker, rerank_adapters["qv"]).predict(PAIRS)
                  ).max() <= TOLERANCE
    assert np.abs(model.predict(PAIRS) - eager).max() <= TOLERANCE
    model.disable_adapters()
    assert np.abs(model.predict(PAIRS) - _eager(reranker).predict(PAIRS)).max() <= BASE_TOLERANCE
    with pytest.raises(AdapterNotFoundError, match=r"nope"):
        model.predict(PAIRS, adapter="nope")


def test_runtime_merge_adapter_keeps_the_scores(switchable_reranker, reranker, rerank_adapters):
    model = CrossEncoderModel(switchable_reranker)
    model.merge_adapter("qv")
    assert model.merged_adapters() == ["qv"]
    eager = _eager(reranker, rerank_adapters["qv"]).predict(PAIRS)
    assert np.abs(model.predict(PAIRS, adapter="qv") - eager).max() <= TOLERANCE
    # The other adapter and the base still run on the LoRA branches.
    assert np.abs(model.predict(PAIRS, adapter="qk") - _eager(reranker, rerank_adapters["qk"]).predict(PAIRS)
                  ).max() <= TOLERANCE
    assert np.abs(model.predict(PAIRS, adapter=False) - _eager(reranker).predict(PAIRS)).max() <= BASE_TOLERANCE


@pytest.mark.slow
def test_add_and_remove_adapter_on_a_switchable_reranker(reranker, rerank_adapters, query_adapter, tmp_path):
    from peft_export.export.switchable_changes import add_adapter
    from peft_export.export.switchable_folder import remove_adapter

    folder = tmp_path / "sw"
    peft_export.export_onnx_model(str(reranker["base"]), folder, log=lambda msg: None, switchable=True,
                                  adapters=[f"qv={rerank_adapters['qv']}"])
    entry = add_adapter(folder, f"q={query_adapter}", log=lambda msg: None)
    assert max(entry["validation"]["vs_eager_peft"]["max_abs_diff"].values()) <= TOLERANCE
    assert set(entry["validation"]["vs_eager_peft"]["max_abs_diff"]) == {"logits", "scores"}
    model = CrossEncoderModel(folder)
    assert model.list_adapters() == ["qv", "q"]
    eager = _eager(reranker, query_adapter).predict(PAIRS)
    assert np.abs(model.predict(PAIRS, adapter="q") - eager).max() <= TOLERANCE
    remove_adapter(folder, "q", log=lambda msg: None)
    model = CrossEncoderModel(folder)
    assert model.list_adapters() == ["qv"]
    with pytest.raises(AdapterNotFoundError, match=r"'q'"):
        model.predict(PAIRS, adapter="q")
    assert not list((folder / "adapters").glob("q.*"))


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs"])
def test_an_adapter_name_with_path_characters_is_refused_by_the_naming_rule(switchable_reranker, query_adapter,
                                                                             name, capsys):
    """It used to be read as part of the path, and add-adapter answered "Name the adapter: NAME=../x=PATH", for an
    adapter that was named."""
    from peft_export.cli import main

    before = _files(switchable_reranker)
    assert main(["add-adapter", str(switchable_reranker), f"{name}={query_adapter}"]) == 2
    assert f"Adapter name {name!r} must be 1 to 64 characters of ASCII letters" in capsys.readouterr().err
    assert _files(switchable_reranker) == before


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_change_while_another_runs_is_refused_never_waited_for(reranker, switchable_reranker, query_adapter,
                                                                 tmp_path):
    """RELIABILITY 45: while one process changes an export (add/remove-adapter, or an export over it with force),
    a second change is refused at once, and the folder stays as the first leaves it. The lock used to make the
    second wait for the first, and then run on whatever it found; an export with force swapped the folder under a
    running add-adapter, which then wrote its adapter and manifest into the new export."""
    from peft_export.export.switchable_changes import add_adapter
    from peft_export.export.switchable_folder import locked, remove_adapter

    folder = tmp_path / "sw"
    shutil.copytree(switchable_reranker, folder)
    before = _files(folder)
    outcome = {}

    def remove():
        try:
            remove_adapter(folder, "qk", log=lambda msg: None)
        except OutputExistsError as err:
            outcome["error"] = err

    busy = r"is being changed by another peft-export process \(add-adapter, remove-adapter or an export with --force\)"
    with locked(folder):  # another process's change (another open file: flock conflicts as between processes)
        worker = threading.Thread(target=remove, daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "remove-adapter waited for the running change"
        assert re.search(busy, str(outcome["error"]))
        with pytest.raises(OutputExistsError, match=busy):
            add_adapter(folder, f"q={query_adapter}", log=lambda msg: None)
        with pytest.raises(OutputExistsError, match=busy):
            peft_export.export_onnx_model(str(reranker["base"]), folder, switchable=True, force=True,
                                          adapters=[f"q={query_adapter}"], log=lambda msg: None)
    assert _files(folder) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".peft-export-tmp-")]


@pytest.mark.slow
def test_cli_switchable_reranker_export_add_and_remove(reranker, rerank_adapters, query_adapter, tmp_path):
    from peft_export.cli import main

    folder = tmp_path / "cli-sw"
    assert main(["merge-onnx", str(reranker["base"]), "-o", str(folder), "--switchable",
                 "--adapter", f"qv={rerank_adapters['qv']}"]) == 0
    assert main(["add-adapter", str(folder), f"q={query_adapter}"]) == 0
    assert main(["remove-adapter", str(folder), "qv"]) == 0
    model = CrossEncoderModel(folder)
    assert model.list_adapters() == ["q"]
    eager = _eager(reranker, query_adapter).predict(PAIRS)
    assert np.abs(model.predict(PAIRS, adapter="q") - eager).max() <= TOLERANCE


@pytest.mark.slow
def test_openvino_switchable_reranker_matches_eager(reranker, rerank_adapters, tmp_path):
    pytest.importorskip("openvino")
    folder = tmp_path / "ov-sw"
    peft_export.export_openvino_model(str(reranker["base"]), folder, log=lambda msg: None, switchable=True,
                                      adapters=[f"{n}={p}" for n, p in rerank_adapters.items()])
    model = CrossEncoderModel(folder)
    assert model.backend.name == "openvino"
    for name, adapter_folder in rerank_adapters.items():
        eager = _eager(reranker, adapter_folder).predict(PAIRS)
        assert np.abs(model.predict(PAIRS, adapter=name) - eager).max() <= TOLERANCE
    assert np.abs(model.predict(PAIRS, adapter=False) - _eager(reranker).predict(PAIRS)).max() <= BASE_TOLERANCE
