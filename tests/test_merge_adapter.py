"""EmbeddingModel.merge_adapter: adapters of a switchable export run from their own session with the LoRA update
merged into the weights. Results must equal the merged export of that adapter and eager sentence-transformers,
the rest of the model (base, other adapters, state) must not change, and unmerging must give the switchable
path back."""

from __future__ import annotations

import pytest
from switchable_fixtures import (ADAPTERS, TEXTS, concurrent_adapter_errors, max_unit_diff, merged_export,
                                 st_references, switchable_export)

from peft_export import AdapterNotFoundError, ConfigError, EmbeddingModel
from peft_export.runtime.onnxruntime_merge_adapter import MergedAdapter, cut_branches

SENTENCE_ATOL = 1e-5


@pytest.fixture
def model() -> EmbeddingModel:
    return EmbeddingModel(switchable_export())


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_merged_adapter_equals_its_merged_export_and_sentence_transformers(model, name):
    model.merge_adapter(name)
    assert model.merged_adapters() == [name]
    got = model.encode(TEXTS, adapter=name)
    assert max_unit_diff(got, EmbeddingModel(merged_export(name)).encode(TEXTS)) <= SENTENCE_ATOL
    assert max_unit_diff(got, st_references()[name]) <= SENTENCE_ATOL
    others = [n for n in ADAPTERS if n != name]
    for other in others:  # the adapters left on the switchable graph are untouched
        assert max_unit_diff(model.encode(TEXTS, adapter=other), st_references()[other]) <= SENTENCE_ATOL
    assert max_unit_diff(model.encode(TEXTS, adapter=False), st_references()[None]) <= SENTENCE_ATOL


def test_merge_defaults_to_the_active_adapter_and_keeps_the_state(model):
    with pytest.raises(AdapterNotFoundError, match="No adapter is active; pass adapter_names"):
        model.merge_adapter()
    model.set_adapter("ffn")
    model.merge_adapter()
    assert model.merged_adapters() == ["ffn"] and model.active_adapters() == ["ffn"]
    assert max_unit_diff(model.encode(TEXTS), st_references()["ffn"]) <= SENTENCE_ATOL
    model.disable_adapters()  # PEFT meaning still holds: the base runs while adapters are disabled
    assert max_unit_diff(model.encode(TEXTS), st_references()[None]) <= SENTENCE_ATOL
    model.enable_adapters()
    state = model.get_adapter_state_dict("ffn")  # read from the adapter file, not from the merged session
    assert state and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)


def test_unmerge_returns_to_the_switchable_graph(model):
    before = model.encode(TEXTS, adapter="mixed")
    model.merge_adapter(["mixed", "attn"])
    assert model.merged_adapters() == ["attn", "mixed"]  # load order
    model.unmerge_adapter("attn")
    assert model.merged_adapters() == ["mixed"]
    model.unmerge_adapter()
    assert model.merged_adapters() == []
    assert not isinstance(model._adapters["mixed"].adapter, MergedAdapter)
    assert (model.encode(TEXTS, adapter="mixed") == before).all()  # the very same path as before merging


def test_merge_is_idempotent_and_delete_drops_the_session(model):
    model.merge_adapter("attn")
    handle = model._adapters["attn"].adapter
    model.merge_adapter("attn")
    assert model._adapters["attn"].adapter is handle  # not rebuilt
    model.delete_adapter("attn")
    assert model.merged_adapters() == [] and model.list_adapters() == ["ffn", "mixed"]


def test_merge_refuses_unknown_adapters_and_merged_exports(model):
    with pytest.raises(AdapterNotFoundError, match="Adapter with name 'nope' not found"):
        model.merge_adapter(["attn", "nope"])
    assert model.merged_adapters() == []  # nothing half-done
    with pytest.raises(AdapterNotFoundError, match="'nope' not found"):
        model.unmerge_adapter("nope")
    with pytest.raises(ConfigError, match="needs a switchable export"):
        EmbeddingModel(merged_export("attn")).merge_adapter()


def test_merged_adapter_loaded_on_the_fly(model):
    from switchable_fixtures import make_adapter

    model.load_adapter(str(make_adapter("ffn")), adapter_name="ffn-again")
    model.merge_adapter("ffn-again")
    assert max_unit_diff(model.encode(TEXTS, adapter="ffn-again"), st_references()["ffn"]) <= SENTENCE_ATOL


def test_concurrent_calls_mixing_merged_and_switchable_adapters(model):
    model.merge_adapter(["attn", "mixed"])
    assert concurrent_adapter_errors(model, TEXTS, ["attn", "ffn", "mixed"], threads=6, calls=15) == []


def test_cut_branches_leaves_exactly_the_base_graph():
    import onnx

    from peft_export.runtime.config import RuntimeConfig
    from peft_export.runtime.lora_layout import Slot

    folder = switchable_export()
    slots = [Slot.from_dict(s) for s in RuntimeConfig.load(folder).lora_slots]
    model = onnx.load(str(folder / "model.onnx"))
    base_nodes = len(model.graph.node) - 2 * len(slots)  # each branch's Add stays, as an Identity
    weights = cut_branches(model, slots)
    assert sorted(weights) == sorted(s.module for s in slots)
    assert len(model.graph.node) == base_nodes
    assert not [i.name for i in model.graph.input if "lora" in i.name]
    assert not [t.name for t in model.graph.initializer if "lora" in t.name]
    assert sum(n.op_type == "Identity" for n in model.graph.node) >= len(slots)
    onnx.checker.check_model(model)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for slot in slots:
        assert shapes[weights[slot.module]] == (slot.in_features, slot.out_features)


def test_openvino_models_refuse_merge_adapter_clearly():
    pytest.importorskip("openvino")
    from switchable_fixtures import openvino_switchable_export

    model = EmbeddingModel(openvino_switchable_export())
    with pytest.raises(ConfigError, match="merge_adapter\\(\\) needs the ONNX Runtime backend"):
        model.merge_adapter("attn")
    assert model.merged_adapters() == []


def test_merging_and_unmerging_while_other_threads_encode(model):
    def merge_or_unmerge(rng) -> None:
        name = rng.choice(list(ADAPTERS))
        (model.merge_adapter if rng.random() < 0.6 else model.unmerge_adapter)(name)

    # merged and switchable results of one adapter differ by float rounding (~1e-7), hence the sentence tolerance
    assert concurrent_adapter_errors(model, TEXTS, list(ADAPTERS), threads=4, calls=12, disturb=merge_or_unmerge,
                                     atol=SENTENCE_ATOL) == []
    assert set(model.merged_adapters()) <= set(ADAPTERS)


def test_an_update_that_overflows_float32_is_refused_and_the_adapter_keeps_working(model, tmp_path):
    import numpy as np

    from peft_export.runtime.onnxruntime_adapters import read_adapter_arrays, write_adapter_file

    source = switchable_export() / "adapters" / "attn.onnx_adapter"
    huge = {k: np.full_like(v, 1e25) for k, v in read_adapter_arrays(source).items()}  # finite; A @ B is not
    write_adapter_file(tmp_path / "huge.onnx_adapter", huge)
    model.load_adapter(str(tmp_path / "huge.onnx_adapter"), adapter_name="huge")
    with pytest.raises(ConfigError, match="non-finite weights; refused"):
        model.merge_adapter("huge")
    assert model.merged_adapters() == []
    assert model.encode(TEXTS, adapter="attn").shape == (len(TEXTS), 32)


def test_merging_with_threads_that_keep_spinning_warns_and_the_default_does_not(caplog):
    from peft_export import SessionSettings

    quiet = EmbeddingModel(switchable_export())  # default: threads spin during runs only
    with caplog.at_level("WARNING", logger="peft_export.runtime.onnxruntime_backend"):
        quiet.merge_adapter("attn")
    assert "spinning" not in caplog.text
    model = EmbeddingModel(switchable_export(), session_settings=SessionSettings(stop_spinning_between_runs=False))
    with caplog.at_level("WARNING", logger="peft_export.runtime.onnxruntime_backend"):
        model.merge_adapter("attn")
    assert "keep spinning after each run" in caplog.text
    assert max_unit_diff(model.encode(TEXTS, adapter="attn"), st_references()["attn"]) <= SENTENCE_ATOL


def test_without_the_onnx_package_merge_says_what_to_install(model, monkeypatch):
    import sys

    from peft_export.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "onnx", None)  # a serving-only environment: onnxruntime without onnx
    with pytest.raises(MissingDependencyError, match="'onnx' is required .* pip install 'peft_export\\[export\\]'"):
        model.merge_adapter("attn")
    assert model.merged_adapters() == []
    assert max_unit_diff(model.encode(TEXTS, adapter="attn"), st_references()["attn"]) <= SENTENCE_ATOL


def test_a_full_temporary_disk_gives_a_clear_error_and_leaves_no_file(model, monkeypatch, tmp_path):
    import errno
    import os
    import tempfile

    real_fdopen = os.fdopen

    class FullFile:
        def __init__(self, fd):
            self.file = real_fdopen(fd, "wb")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: FullFile(fd))
    with pytest.raises(ConfigError, match="No space left on device. Free space there or point TMPDIR elsewhere"):
        model.merge_adapter("attn")
    assert model.merged_adapters() == []
    assert list(tmp_path.iterdir()) == []  # the partial file is gone


def test_merged_sessions_fuse_attention_as_the_merged_export_does(model, monkeypatch):
    """The switchable export records its attention shape; a merged adapter's graph is fused like a merged export's
    (same graph, same speed). The "ffn" adapter leaves query/key/value alone, "attn" merges into them before the
    query/key/value weights are packed."""
    from peft_export.runtime import onnxruntime_fusion

    attention = model.manifest["export"]["attention"]
    assert attention == {"num_heads": 2, "hidden_size": 32, "bert_optimizer": True}  # tests/fixtures/tiny_models.py
    counts = []
    real = onnxruntime_fusion.fuse_attention

    def recording(graph, shape, **kwargs):
        fused, found = real(graph, shape, **kwargs)
        counts.append(({**shape.to_dict(), **kwargs}, found["Attention"]))
        return fused, found

    monkeypatch.setattr(onnxruntime_fusion, "fuse_attention", recording)
    model.merge_adapter(["ffn", "attn"])
    assert counts == [(attention, 2), (attention, 2)]  # every layer of both merged graphs
    for name in ("ffn", "attn"):
        got = model.encode(TEXTS, adapter=name)
        assert max_unit_diff(got, EmbeddingModel(merged_export(name)).encode(TEXTS)) <= SENTENCE_ATOL
        assert max_unit_diff(got, st_references()[name]) <= SENTENCE_ATOL


def test_merge_adapter_runs_unfused_when_the_optimizer_fails(model, monkeypatch, caplog):
    from peft_export.runtime import onnxruntime_fusion

    def crash(graph, shape, **kwargs):
        raise RuntimeError("optimizer bug")

    monkeypatch.setattr(onnxruntime_fusion, "fuse_attention", crash)
    with caplog.at_level("WARNING"):
        model.merge_adapter("mixed")
    assert "attention fusion failed (RuntimeError: optimizer bug); the merged graph runs unfused" in caplog.text
    got = model.encode(TEXTS, adapter="mixed")
    assert max_unit_diff(got, EmbeddingModel(merged_export("mixed")).encode(TEXTS)) <= SENTENCE_ATOL
