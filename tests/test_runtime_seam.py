"""The runtime side of the task seam (issue 24): ExportedModel holds what every exported model shares, each task's
class refuses another task's export naming the right class, every backend has every verb of the Backend protocol,
and ``peft_export.load`` opens an export with its task's class."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import peft_export
from peft_export import ConfigError, EmbeddingModel
from peft_export.runtime.backends import Backend
from peft_export.runtime.exported_model import ExportedModel, runtime_class_for
from peft_export.runtime.onnxruntime_backend import OnnxRuntimeBackend
from peft_export.runtime.openvino_backend import OpenVinoBackend
from peft_export.tasks import TASKS, load_reference

TEXTS = ["a short one", "a somewhat longer sentence about exported models", "x"]


def _copy_with_task(source: Path, dest: Path, task) -> Path:
    """A copy of the export whose manifest records ``task`` (the manifest is the one file no hash covers)."""
    shutil.copytree(source, dest)
    manifest = json.loads((dest / "peft_export.json").read_text())
    manifest["task"] = task
    (dest / "peft_export.json").write_text(json.dumps(manifest))
    return dest


class PairScorer(ExportedModel):
    """A second task's class, standing in for the reranker class to come."""

    task = "test-pair-scoring"


# ----- the task check -----

def test_an_export_of_an_unknown_task_is_refused_by_the_embedding_class(bert_case, tmp_path):
    folder = _copy_with_task(bert_case.export, tmp_path / "export", "sparse")
    with pytest.raises(ConfigError, match=r"is an export of the 'sparse' task \(its peft_export.json says so\); "
                                          r"EmbeddingModel opens 'embedding' exports, and this version of peft_export "
                                          r"has no class for 'sparse' exports"):
        EmbeddingModel(folder)


def test_the_refusal_names_the_class_of_the_exports_task(bert_case, tmp_path):
    folder = _copy_with_task(bert_case.export, tmp_path / "export", PairScorer.task)
    with pytest.raises(ConfigError, match=r"EmbeddingModel opens 'embedding' exports\. Open it with PairScorer "
                                          r"\(from test_runtime_seam\), or with peft_export.load\(path\)"):
        EmbeddingModel(folder)


def test_another_tasks_class_refuses_an_embedding_export_naming_embedding_model(bert_case):
    with pytest.raises(ConfigError, match=r"is an export of the 'embedding' task .*; PairScorer opens "
                                          r"'test-pair-scoring' exports\. Open it with EmbeddingModel \(from "
                                          r"peft_export.runtime.model\)"):
        PairScorer(bert_case.export)


def test_an_export_without_a_task_is_an_embedding_export(bert_case, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(bert_case.export, folder)
    manifest = json.loads((folder / "peft_export.json").read_text())
    manifest.pop("task", None)
    (folder / "peft_export.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="PairScorer opens 'test-pair-scoring' exports"):
        PairScorer(folder)
    got = EmbeddingModel(folder).encode(TEXTS)
    np.testing.assert_array_equal(got, bert_case.embedding_model().encode(TEXTS))


def test_another_tasks_export_without_this_class_config_file_names_the_class(bert_case, tmp_path):
    """A reranker export need not have embedding_config.json: the task decides the message, not the missing file."""
    folder = _copy_with_task(bert_case.export, tmp_path / "export", PairScorer.task)
    (folder / "embedding_config.json").unlink()
    with pytest.raises(ConfigError, match="Open it with PairScorer"):
        EmbeddingModel(folder)


def test_a_task_that_is_not_a_string_is_refused(bert_case, tmp_path):
    folder = _copy_with_task(bert_case.export, tmp_path / "export", ["embedding"])
    with pytest.raises(ConfigError, match=r"peft_export.json: task must be a string such as 'embedding', found "
                                          r"\['embedding'\]"):
        EmbeddingModel(folder)


def test_the_base_class_opens_no_export(bert_case):
    with pytest.raises(ConfigError, match=r"ExportedModel runs no task; open .* with peft_export.load\(path\)"):
        ExportedModel(bert_case.export)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_and_its_runtime_class_agree(name):
    task = TASKS[name]
    runtime_class = load_reference(task.runtime_class)
    assert issubclass(runtime_class, ExportedModel)
    assert runtime_class.task == task.name
    assert runtime_class.runtime_config_file == task.runtime_config_file
    assert runtime_class_for(task.name) is runtime_class
    assert set(task.output_names) >= set(runtime_class.required_outputs)
    assert callable(load_reference(task.routes))


# ----- peft_export.load -----

def test_load_opens_an_embedding_export_as_embedding_model(bert_case):
    model = peft_export.load(bert_case.export, backend="onnxruntime", intra_op_threads=1)
    assert type(model) is EmbeddingModel
    assert model.backend.settings.intra_op_threads == 1
    np.testing.assert_array_equal(model.encode(TEXTS), bert_case.embedding_model().encode(TEXTS))


def test_load_names_the_tasks_this_version_knows(bert_case, tmp_path):
    folder = _copy_with_task(bert_case.export, tmp_path / "export", "sparse")
    with pytest.raises(ConfigError, match=r"Unknown task 'sparse'; this version of peft_export knows embedding, "
                                          r"reranker\. Upgrade peft_export to open this export"):
        peft_export.load(folder)


def test_load_of_a_folder_that_is_no_export(tmp_path):
    with pytest.raises(ConfigError, match="Export folder not found"):
        peft_export.load(tmp_path / "missing")
    with pytest.raises(ConfigError, match="has no peft_export.json"):
        peft_export.load(tmp_path)


# ----- the backend protocol -----

def _protocol_members() -> tuple[list[str], list[str]]:
    """(methods, data attributes) the Backend protocol declares."""
    methods = [name for name, value in vars(Backend).items() if inspect.isfunction(value) and not name.startswith("_")]
    attributes = [name for name in Backend.__annotations__ if not name.startswith("_")]
    return methods, attributes


@pytest.mark.parametrize("backend_class", [OnnxRuntimeBackend, OpenVinoBackend])
def test_each_backend_has_every_verb_with_the_protocols_signature(backend_class):
    methods, _ = _protocol_members()
    assert {"run", "run_batches", "output_width", "describe", "read_adapter", "load_adapter", "adapter_from_arrays",
            "adapter_arrays", "merge_adapter"} <= set(methods)
    for name in methods:
        implementation = getattr(backend_class, name, None)
        assert implementation is not None, f"{backend_class.__name__} lacks {name}"
        want = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(Backend, name)).parameters.values()]
        got = [(p.name, p.kind, p.default) for p in inspect.signature(implementation).parameters.values()]
        assert got == want, f"{backend_class.__name__}.{name}"


def test_both_opened_backends_satisfy_the_protocol(bert_case):
    pytest.importorskip("openvino")
    _, attributes = _protocol_members()
    assert {"name", "providers", "input_names", "output_names", "lora_input_names", "parallel_requests",
            "can_merge_adapters"} <= set(attributes)
    onnx = bert_case.export / "model.onnx"
    for backend in (OnnxRuntimeBackend(onnx), OpenVinoBackend(onnx)):
        assert isinstance(backend, Backend)
        missing = [name for name in attributes if not hasattr(backend, name)]
        assert missing == [], f"{backend.name} lacks {missing}"
        assert backend.parallel_requests >= 1 and isinstance(backend.can_merge_adapters, bool)


class _OnlyTheProtocol:
    """A backend that answers the protocol's verbs and nothing else: the model must not reach past them."""

    def __init__(self, backend):
        methods, attributes = _protocol_members()
        self._backend, self._allowed = backend, set(methods) | set(attributes)

    def __getattr__(self, name):
        if name not in self._allowed:
            raise AttributeError(f"{name} is not a verb of the Backend protocol")
        return getattr(self._backend, name)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_encode_uses_only_the_protocols_verbs(bert_case, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    model = bert_case.embedding_model(backend=backend)
    expected = model.encode(TEXTS, batch_size=1)
    model.backend = _OnlyTheProtocol(model.backend)
    np.testing.assert_array_equal(model.encode(TEXTS, batch_size=1), expected)
    assert model.info()["backend"] == backend


def test_openvino_refuses_merge_adapter_itself():
    with pytest.raises(ConfigError, match="merge_adapter needs the ONNX Runtime backend"):
        OpenVinoBackend.merge_adapter(object.__new__(OpenVinoBackend), None, [])


def test_pre_tokenized_inputs_are_batched_as_texts_are(bert_case):
    """batches_of (what a pair task feeds with its own encodings) plans and pads as batches(texts) does."""
    model = bert_case.embedding_model()
    texts = ["a much longer sentence than the others, to be batched first", "short", "mid length text"] * 3
    tokenizer = model._tokenizer
    budget = model._token_budget("auto")
    assert budget == model.max_batch_tokens
    expected = list(tokenizer.batches(texts, 4, 40))
    got = list(tokenizer.batches_of(tokenizer.tokenize(texts), 4, 40))
    assert len(got) == len(expected) > 1
    for (index, feeds), (want_index, want_feeds) in zip(got, expected):
        np.testing.assert_array_equal(index, want_index)
        assert feeds.keys() == want_feeds.keys()
        for name in feeds:
            np.testing.assert_array_equal(feeds[name], want_feeds[name])
