"""Switchable adapters on OpenVINO (merge-openvino --switchable): the same adapter API and the same parity as on
ONNX Runtime. Every adapter through the IR equals the ONNX Runtime switchable graph, its merged export and
sentence-transformers; no adapter equals the base export; per-call choices, threads, add/remove-adapter and
tampered adapter files behave as on ONNX Runtime."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures.export_edits import rehash, write_runtime_config
from switchable_fixtures import (ADAPTERS, QUERY_B, TAMPERED_ADAPTERS, TEXTS, base_model, check_switch_order,
                                 concurrent_adapter_errors, copy_export, make_adapter, max_unit_diff, merged_export,
                                 openvino_switchable_export, quiet, snapshot, st_references, switchable_export)

from peft_export import AdapterNotFoundError, ConfigError, EmbeddingModel, UnsafeModelError, ValidationError
from peft_export.cli import main as cli_main

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'peft_export[openvino]')")

SENTENCE_ATOL = 1e-5
BASE_ATOL = 1e-6
LATE = dict(r=3, lora_alpha=6, target_modules=["query", "dense"])


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel(openvino_switchable_export())


@pytest.fixture(scope="module")
def onnx_model() -> EmbeddingModel:
    return EmbeddingModel(switchable_export())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_folder_holds_an_ir_and_safetensors_adapters():
    folder = openvino_switchable_export()
    config = json.loads((folder / "embedding_config.json").read_text())
    manifest = json.loads((folder / "peft_export.json").read_text())
    assert sorted(p.name for p in (folder / "adapters").iterdir()) == [f"{n}.safetensors" for n in sorted(ADAPTERS)]
    assert not list(folder.rglob("*.onnx")) and not [p for p in folder.iterdir() if p.name.startswith(".")]
    assert config["backend"] == "openvino" and config["model_file"] == "openvino_model.xml"
    assert [e["file"] for e in manifest["adapters"] if e["name"] == "attn"] == ["adapters/attn.safetensors"]
    assert manifest["merge_mode"] == "switchable"
    export = manifest["export"]
    assert export["format"] == "openvino" and export["weight_format"] == "fp32"
    assert export["adapter_format"] == "safetensors" and export["openvino_version"]
    assert export["files"] == ["openvino_model.xml", "openvino_model.bin"] + [
        f"adapters/{n}.safetensors" for n in ADAPTERS]
    assert manifest["validation"]["no_adapter_vs_base"]["max_abs_diff"]["sentence_embedding"] <= BASE_ATOL
    for entry in manifest["adapters"]:
        assert entry["file_sha256"] == _sha(folder / entry["file"])
        assert entry["validation"]["vs_eager_peft"]["max_abs_diff"]["sentence_embedding"] <= SENTENCE_ATOL
        assert entry["validation"]["vs_merged_pytorch"]["sentence_embedding"] <= SENTENCE_ATOL
    # Same slots and same factors as the ONNX Runtime export of the same adapters.
    onnx_config = json.loads((switchable_export() / "embedding_config.json").read_text())
    assert config["lora_slots"] == onnx_config["lora_slots"]
    from safetensors.numpy import load_file

    from peft_export.runtime.onnxruntime_adapters import read_adapter_arrays

    for name in ADAPTERS:
        ours = load_file(str(folder / "adapters" / f"{name}.safetensors"))
        theirs = read_adapter_arrays(switchable_export() / "adapters" / f"{name}.onnx_adapter")
        assert sorted(ours) == sorted(theirs)
        assert all(np.array_equal(ours[k], theirs[k]) for k in ours)


def _lora_shapes(ir) -> dict[str, list]:
    return {p.get_any_name(): [None if d.is_dynamic else d.get_length() for d in p.get_partial_shape()]
            for p in ir.inputs if ".lora_" in p.get_any_name()}


def test_rank_zero_b_is_a_broadcast_column_and_older_irs_keep_full_width(model, tmp_path):
    import openvino as ov

    folder = openvino_switchable_export()
    slots = json.loads((folder / "embedding_config.json").read_text())["lora_slots"]
    shapes = _lora_shapes(ov.Core().read_model(str(folder / "openvino_model.xml")))
    defaults = model.backend._lora_defaults
    for slot in slots:
        a, b = f"{slot['module']}.lora_A", f"{slot['module']}.lora_B"
        assert shapes[a] == [slot["in_features"], None] and shapes[b] == [None, None]
        assert defaults[a].shape == (slot["in_features"], 0) and defaults[b].shape == (0, 1)
    # An IR written before B's out axis was dynamic: rank-0 B stays (0, out), results unchanged.
    old = copy_export(folder, tmp_path / "static-out")
    ir = ov.Core().read_model(str(folder / "openvino_model.xml"))  # not the copy: saving over a mapped .bin faults
    ir.reshape({p: ov.PartialShape([-1, slot["out_features"]]) for slot in slots for p in ir.inputs
                if p.get_any_name() == f"{slot['module']}.lora_B"})
    ov.save_model(ir, str(old / "openvino_model.xml"), compress_to_fp16=False)
    rehash(old, "openvino_model.xml", "openvino_model.bin")
    older = EmbeddingModel(old)
    for slot in slots:
        assert older.backend._lora_defaults[f"{slot['module']}.lora_B"].shape == (0, slot["out_features"])
    for name in ("mixed", False):
        assert max_unit_diff(older.encode(TEXTS, adapter=name), model.encode(TEXTS, adapter=name)) <= 1e-7
    with pytest.raises(ConfigError, match=f"'{QUERY_B}' has shape \\(2, 48\\); this graph expects \\(r, 32\\)"):
        older.backend.adapter_from_arrays({QUERY_B: np.zeros((2, 48), np.float32)})


@pytest.mark.parametrize("name", [*ADAPTERS, None])
def test_openvino_equals_onnx_runtime_merged_export_and_sentence_transformers(model, onnx_model, name):
    assert model.backend.name == "openvino" and model.backend.input_names == onnx_model.backend.input_names
    call = name if name is not None else False
    got = model.encode(TEXTS, adapter=call, batch_size=3)
    assert max_unit_diff(got, onnx_model.encode(TEXTS, adapter=call, batch_size=3)) <= SENTENCE_ATOL
    assert max_unit_diff(got, EmbeddingModel(merged_export(name)).encode(TEXTS)) <= (
        SENTENCE_ATOL if name else BASE_ATOL)
    assert max_unit_diff(got, st_references()[name]) <= SENTENCE_ATOL


def test_fresh_export_runs_as_the_base_and_adapters_differ(model):
    assert model.active_adapters() == [] and model.list_adapters() == list(ADAPTERS)
    outputs = {name: model.encode(TEXTS, adapter=name) for name in ADAPTERS}
    outputs[None] = model.encode(TEXTS)
    assert max_unit_diff(outputs[None], EmbeddingModel(merged_export(None)).encode(TEXTS)) <= BASE_ATOL
    for a, b in itertools.combinations(outputs, 2):
        assert max_unit_diff(outputs[a], outputs[b]) > 1e-3, (a, b)


@pytest.mark.parametrize("order", list(itertools.permutations([*ADAPTERS, None])))
def test_every_switch_order_matches_sentence_transformers(model, order):
    check_switch_order(model, order, SENTENCE_ATOL)


def test_per_call_adapter_leaves_the_model_state_alone(model):
    expected = st_references()
    model.set_adapter("mixed")
    assert max_unit_diff(model.encode(TEXTS, adapter="attn"), expected["attn"]) <= SENTENCE_ATOL
    assert max_unit_diff(model.encode(TEXTS, adapter=False), expected[None]) <= SENTENCE_ATOL
    assert model.active_adapters() == ["mixed"]
    assert max_unit_diff(model.encode(TEXTS), expected["mixed"]) <= SENTENCE_ATOL
    assert model.encode("one string", adapter="ffn").shape == (32,)
    assert model.encode([], adapter="ffn").shape == (0, 32)
    for batch in (1, 2, 7):  # untraced batch sizes, and a text truncated at max_seq_length
        assert model.encode((TEXTS * 2)[:batch], adapter="mixed").shape == (batch, 32)
    with pytest.raises(AdapterNotFoundError, match="Loaded adapters: \\['attn', 'ffn', 'mixed'\\]"):
        model.encode(TEXTS, adapter="../attn")
    model.set_adapter("attn")


@pytest.mark.parametrize("hint", ["LATENCY", "THROUGHPUT"])
def test_concurrent_calls_never_see_each_others_adapter(hint):
    # THROUGHPUT runs the batches of one call in parallel requests (AsyncInferQueue) as well.
    model = EmbeddingModel(openvino_switchable_export(), performance_hint=hint)
    assert concurrent_adapter_errors(model, TEXTS, ADAPTERS, threads=6, calls=20) == []
    choices = [*ADAPTERS, False]
    single = {name: model.encode(TEXTS, adapter=name, batch_size=2) for name in choices}
    for name in choices:  # and the single-threaded results are those of the ONNX Runtime graph
        assert max_unit_diff(single[name], st_references()[name or None]) <= SENTENCE_ATOL


def test_load_state_dict_and_delete_like_onnx_runtime(tmp_path, onnx_model):
    model = EmbeddingModel(openvino_switchable_export())
    expected = st_references()
    copy = tmp_path / "ffn-copy.safetensors"
    shutil.copy(openvino_switchable_export() / "adapters" / "ffn.safetensors", copy)
    model.load_adapter(copy, adapter_name="from-file")
    assert model.active_adapters() == ["from-file"]
    model.load_adapter(switchable_export() / "adapters" / "attn.onnx_adapter", adapter_name="from-ort-file")
    model.load_adapter(str(make_adapter("mixed")), adapter_name="from-peft")  # converted on the fly (needs torch)
    assert max_unit_diff(model.encode(TEXTS, adapter="from-file"), expected["ffn"]) <= SENTENCE_ATOL
    assert max_unit_diff(model.encode(TEXTS, adapter="from-ort-file"), expected["attn"]) <= SENTENCE_ATOL
    assert max_unit_diff(model.encode(TEXTS, adapter="from-peft"), expected["mixed"]) <= SENTENCE_ATOL
    for name in ADAPTERS:
        ours, theirs = model.get_adapter_state_dict(name), onnx_model.get_adapter_state_dict(name)
        assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    state = model.get_adapter_state_dict("from-peft")
    state[next(iter(state))][:] = 1e6  # a copy: the loaded adapter is not changed through it
    assert max_unit_diff(model.encode(TEXTS, adapter="from-peft"), expected["mixed"]) <= SENTENCE_ATOL
    model.set_adapter("ffn")
    with pytest.warns(UserWarning, match="ffn was active which is now deleted. Setting active adapter to attn"):
        model.delete_adapter("ffn")
    assert model.list_adapters() == ["attn", "mixed", "from-file", "from-ort-file", "from-peft"]
    assert (openvino_switchable_export() / "adapters" / "ffn.safetensors").is_file()


def _write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    save_file(arrays, str(path))
    return path


@pytest.mark.parametrize("mutate, message", [
    *TAMPERED_ADAPTERS,
    (lambda a: a.update({"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight":
                         np.zeros((2, 32), np.float32)}), "is not a LoRA input of this graph"),
])
def test_tampered_adapter_files_are_refused(model, tmp_path, mutate, message):
    arrays = model.backend.read_adapter(openvino_switchable_export() / "adapters" / "attn.safetensors")
    mutate(arrays)
    with pytest.raises(ConfigError, match=message):
        model.load_adapter(_write(tmp_path / "bad.safetensors", arrays), adapter_name="bad")
    assert "bad" not in model.list_adapters()


def _record(folder, name, **changes):
    """Edit adapter ``name``'s manifest entry; its sha256 follows the file, as an attacker would write it."""
    manifest = json.loads((folder / "peft_export.json").read_text())
    entry = next(e for e in manifest["adapters"] if e["name"] == name)
    entry.update(changes)
    if (folder / entry["file"]).is_file():
        entry["file_sha256"] = _sha(folder / entry["file"])
    (folder / "peft_export.json").write_text(json.dumps(manifest))


def test_bad_adapter_files_in_an_export_are_refused_at_load(tmp_path):
    corrupt = copy_export(openvino_switchable_export(), tmp_path / "corrupt")
    (corrupt / "adapters" / "attn.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConfigError, match="attn.safetensors does not hold what peft_export.json records"):
        EmbeddingModel(corrupt)
    _record(corrupt, "attn")
    with pytest.raises(ConfigError, match="attn.safetensors is not a valid adapter file \\(safetensors"):
        EmbeddingModel(corrupt)
    nan = copy_export(openvino_switchable_export(), tmp_path / "nan")
    arrays = dict(EmbeddingModel(openvino_switchable_export()).backend.read_adapter(
        nan / "adapters" / "mixed.safetensors"))
    arrays[QUERY_B] = np.full_like(arrays[QUERY_B], np.inf)
    _write(nan / "adapters" / "mixed.safetensors", arrays)
    _record(nan, "mixed")
    with pytest.raises(ConfigError, match=f"mixed.safetensors: '{QUERY_B}' contains NaN or Inf"):
        EmbeddingModel(nan)
    escaping = copy_export(openvino_switchable_export(), tmp_path / "escaping")
    _record(escaping, "attn", file="../corrupt/adapters/ffn.safetensors")
    with pytest.raises(UnsafeModelError, match="points outside the export folder"):
        EmbeddingModel(escaping)
    swapped = copy_export(openvino_switchable_export("attn-only", ("attn",)), tmp_path / "swapped")
    shutil.copy(openvino_switchable_export() / "adapters" / "ffn.safetensors",
                swapped / "adapters" / "attn.safetensors")
    _record(swapped, "attn")
    with pytest.raises(ConfigError, match="is not a LoRA input of this graph"):
        EmbeddingModel(swapped)


def test_onnx_switchable_folder_and_inconsistent_configs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="switchable-adapter ONNX export .*which OpenVINO cannot read.*"
                                          "merge-openvino BASE --switchable"):
        EmbeddingModel(switchable_export(), backend="openvino")
    with pytest.raises(ConfigError, match="holds an OpenVINO model"):
        EmbeddingModel(openvino_switchable_export(), backend="onnxruntime")
    stripped = copy_export(openvino_switchable_export(), tmp_path / "stripped")
    config = json.loads((stripped / "embedding_config.json").read_text())
    config["lora_slots"] = config["lora_slots"][1:]
    write_runtime_config(stripped, config)
    with pytest.raises(ConfigError, match="LoRA inputs do not match embedding_config.json"):
        EmbeddingModel(stripped)
    config["lora_slots"] = []
    write_runtime_config(stripped, config)
    with pytest.raises(ConfigError, match="lists adapters \\(attn, ffn, mixed\\) but the graph has no LoRA branches"):
        EmbeddingModel(stripped)


def test_export_refuses_compressed_weights_with_switchable(tmp_path):
    from peft_export import export_openvino_model

    for weight_format in ("fp16", "int8"):
        with pytest.raises(ConfigError, match=f"weight_format='{weight_format}' is not supported with switchable=True"):
            export_openvino_model(str(base_model()), tmp_path / "out", weight_format=weight_format,
                                  adapters=[f"attn={make_adapter('attn')}"], switchable=True, log=quiet)
    assert not (tmp_path / "out").exists()


def _st_with(adapter_folder):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(base_model()), device="cpu")
    model.load_adapter(str(adapter_folder), adapter_name="x")
    model.set_adapter("x")
    return model.encode(TEXTS)


def test_add_and_remove_adapter_on_an_openvino_folder(tmp_path, capsys):
    from peft_export.export.switchable_changes import add_adapter

    folder = copy_export(openvino_switchable_export(), tmp_path / "export")
    graph = {name: _sha(folder / name) for name in ("openvino_model.xml", "openvino_model.bin")}
    late = make_adapter("late", **LATE)
    assert cli_main(["add-adapter", str(folder), f"late={late}"]) == 0
    assert "added adapter 'late'" in capsys.readouterr().out
    assert (folder / "adapters" / "late.safetensors").is_file()
    assert not list(folder.rglob("*.onnx_adapter")) and not list(folder.rglob("*.candidate"))
    model = EmbeddingModel(folder)
    assert model.list_adapters() == ["attn", "ffn", "mixed", "late"]
    assert max_unit_diff(model.encode(TEXTS, adapter="late"), _st_with(late)) <= SENTENCE_ATOL
    manifest = json.loads((folder / "peft_export.json").read_text())
    entry = manifest["adapters"][-1]
    assert entry["file"] == "adapters/late.safetensors" and entry["file_sha256"] == _sha(folder / entry["file"])
    assert entry["validation"]["vs_merged_pytorch"]["sentence_embedding"] <= SENTENCE_ATOL
    assert manifest["export"]["files"][:2] == ["openvino_model.xml", "openvino_model.bin"]
    assert manifest["export"]["files"][-1] == "adapters/late.safetensors"

    # A rejected add leaves the folder byte for byte as it was.
    before = snapshot(folder)
    with pytest.raises(ValidationError, match="'again' and 'attn' give the same normalised embeddings"):
        add_adapter(folder, f"again={make_adapter('attn')}", log=quiet)
    foreign = make_adapter("foreign", base=base_model("wide", hidden=48, seed=3), r=2, lora_alpha=4,
                           target_modules=["query"])
    with pytest.raises(ConfigError, match="was this adapter trained on another base"):
        add_adapter(folder, f"foreign={foreign}", log=quiet)
    assert snapshot(folder) == before

    assert cli_main(["remove-adapter", str(folder), "ffn"]) == 0
    assert not (folder / "adapters" / "ffn.safetensors").exists()
    assert EmbeddingModel(folder).list_adapters() == ["attn", "mixed", "late"]
    manifest = json.loads((folder / "peft_export.json").read_text())
    assert "adapters/ffn.safetensors" not in manifest["export"]["files"]
    assert {name: _sha(folder / name) for name in graph} == graph


def test_cli_default_adapter_and_encode(tmp_path, capsys):
    out = tmp_path / "default"
    code = cli_main(["merge-openvino", str(base_model()), "--adapter", f"ffn={make_adapter('ffn')}",
                     "--adapter", f"attn={make_adapter('attn')}", "--switchable", "--default-adapter", "ffn",
                     "-o", str(out)])
    assert code == 0 and "done:" in capsys.readouterr().out
    model = EmbeddingModel(out)
    assert model.backend.name == "openvino" and model.active_adapters() == ["ffn"]
    assert max_unit_diff(model.encode(TEXTS), st_references()["ffn"]) <= SENTENCE_ATOL
    assert cli_main(["info", str(out)]) == 0
    assert "default adapter: ffn" in capsys.readouterr().out
    assert cli_main(["encode", str(out), TEXTS[1], TEXTS[2], "--adapter", "attn", "--json"]) == 0
    printed = np.array(json.loads(capsys.readouterr().out))
    assert max_unit_diff(printed, st_references()["attn"][1:3]) <= SENTENCE_ATOL


def test_switching_adapters_on_openvino_imports_no_torch_and_no_onnxruntime():
    code = (
        "import sys; from peft_export import EmbeddingModel\n"
        f"m = EmbeddingModel({str(openvino_switchable_export())!r})\n"
        "m.set_adapter('ffn'); m.encode(['a b c']); m.encode(['x'], adapter='attn')\n"
        "m.get_adapter_state_dict('mixed')\n"
        "print(m.backend.name, sorted(k for k in ('torch', 'transformers', 'peft', 'onnxruntime', 'onnx')"
        " if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent)
    assert out.stdout.strip().splitlines()[-1] == "openvino []"


def test_a_threads_request_never_keeps_the_previous_adapter(model):
    # run() sets the LoRA inputs of the thread's request only when the adapter changes; every change must show.
    backend = model.backend
    feeds = model.tokenize(TEXTS[:3])
    handles = {name: model._adapters[name].adapter for name in ADAPTERS}
    fresh = {name: EmbeddingModel(openvino_switchable_export()).backend.run(feeds, adapter=(
        handles[name] if name else None))["sentence_embedding"] for name in [*ADAPTERS, None]}
    copy = backend.adapter_from_arrays(backend.adapter_arrays(handles["ffn"]))  # same values, another handle
    for name in ["attn", None, "attn", "mixed", "ffn", "ffn", None, "mixed", "attn"]:
        got = backend.run(feeds, adapter=handles[name] if name else None)["sentence_embedding"]
        assert np.allclose(got, fresh[name], atol=1e-7, rtol=0), name
    assert np.allclose(backend.run(feeds, adapter=copy)["sentence_embedding"], fresh["ffn"], atol=1e-7, rtol=0)
