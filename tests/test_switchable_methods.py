"""Issue 26 item 3: switchable exports of DoRA, IA3, VeRA and AdaLoRA adapters, mixed with a plain LoRA adapter in
one export, each selected per call and equal to eager PEFT with that adapter (1e-5); the base and plain LoRA run as
before (scale inputs default to ones, and graphs without such adapters have none); runtime merge_adapter folds the
scales from the adapter file's tensors; hostile scale tensors are refused naming the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from method_fixtures import eager, method_adapter
from switchable_fixtures import ROOT, TEXTS, base_model, make_adapter, max_unit_diff, once, quiet

from peft_export import ConfigError, EmbeddingModel
from peft_export.methods.branch import SCALE_IN, SCALE_OUT, SCALE_POST, Branch
from peft_export.runtime.config import RuntimeConfig
from peft_export.runtime.lora_layout import Slot, check_factor_arrays, pack_factors

ATOL = 1e-5
METHODS = ["dora", "ia3", "vera", "adalora"]
QUERY = "encoder.layer.0.attention.self.query"
FFN_OUT = "encoder.layer.0.output.dense"


def _specs() -> list[str]:
    return [f"{n}={method_adapter(n)}" for n in METHODS] + [f"attn={make_adapter('attn')}"]


def mixed_export() -> Path:
    """One switchable ONNX export holding a DoRA, an IA3, a VeRA, an AdaLoRA and a plain LoRA adapter."""
    from peft_export import export_onnx_model

    def build():
        out = ROOT / "switchable-methods"
        export_onnx_model(str(base_model()), out, adapters=_specs(), switchable=True, log=quiet)
        return out

    return once("switchable-methods", build)


def mixed_openvino_export() -> Path:
    from peft_export import export_openvino_model

    def build():
        out = ROOT / "openvino-switchable-methods"
        export_openvino_model(str(base_model()), out, adapters=_specs(), switchable=True, log=quiet)
        return out

    return once("openvino-switchable-methods", build)


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel(mixed_export())


def _entry(folder: Path, name: str) -> dict:
    manifest = json.loads((folder / "peft_export.json").read_text())
    return next(a for a in manifest["adapters"] if a["name"] == name)


@pytest.mark.parametrize("name", METHODS)
def test_each_method_in_one_switchable_export_equals_eager_peft(model, name):
    reference = eager(name)
    got = model.encode(TEXTS, adapter=name)
    validation = _entry(mixed_export(), name)["validation"]
    assert validation["adapter_vs_base_max_abs_diff"] > 1e-3  # the adapter does something
    assert validation["vs_eager_peft"]["max_abs_diff"]["sentence_embedding"] <= ATOL
    assert max_unit_diff(got, reference) <= ATOL
    assert max_unit_diff(got, model.encode(TEXTS, adapter=False)) > 1e-3


def test_scale_inputs_sit_only_where_an_adapter_needs_them(model):
    slots = {s["module"]: s for s in RuntimeConfig.load(mixed_export()).lora_slots}
    assert slots[QUERY]["scales"] == [SCALE_OUT, SCALE_POST]  # DoRA's norm scale, IA3 after the bias
    assert slots[FFN_OUT]["scales"] == [SCALE_IN]  # IA3 on a feed-forward layer scales its input
    assert "scales" not in slots["encoder.layer.0.attention.self.key"]  # only the LoRA adapter is there
    arrays = model.backend.read_adapter(mixed_export() / _entry(mixed_export(), "attn")["file"])
    assert not [n for n in arrays if "scale" in n]  # a LoRA adapter's file has the old layout
    assert _entry(mixed_export(), "dora")["scales"][QUERY] == [SCALE_OUT]
    assert "scales" not in _entry(mixed_export(), "attn")


def test_base_and_plain_lora_are_unchanged_by_the_scale_inputs(model):
    validation = json.loads((mixed_export() / "peft_export.json").read_text())["validation"]
    assert validation["no_adapter_vs_base"]["max_abs_diff"]["sentence_embedding"] <= 1e-6
    assert _entry(mixed_export(), "attn")["validation"]["vs_eager_peft"]["max_abs_diff"]["sentence_embedding"] <= ATOL


def test_an_old_layout_adapter_file_loads_on_a_graph_with_scales(model, tmp_path):
    # The LoRA adapter's file has no scale tensors, as every file written before scales existed.
    old = tmp_path / "old.onnx_adapter"
    shutil.copy(mixed_export() / _entry(mixed_export(), "attn")["file"], old)
    fresh = EmbeddingModel(mixed_export())
    fresh.load_adapter(old, "old")
    assert max_unit_diff(fresh.encode(TEXTS, adapter="old"), fresh.encode(TEXTS, adapter="attn")) == 0.0


def test_merge_adapter_folds_the_scales_and_equals_the_switchable_run():
    fresh = EmbeddingModel(mixed_export())
    switched = {n: fresh.encode(TEXTS, adapter=n) for n in [*METHODS, "attn"]}
    fresh.merge_adapter([*METHODS, "attn"])
    for name, expected in switched.items():
        assert max_unit_diff(fresh.encode(TEXTS, adapter=name), expected) <= 1e-6, name
        if name in METHODS:
            assert max_unit_diff(fresh.encode(TEXTS, adapter=name), eager(name)) <= ATOL, name


def _tampered(name: str, key: str, value, suffix: str, tmp_path):
    """The adapter file of ``name`` with ``key`` replaced by ``value``, written for the backend's suffix."""
    from peft_export.runtime import onnxruntime_adapters

    arrays = onnxruntime_adapters.read_adapter_arrays(mixed_export() / _entry(mixed_export(), name)["file"])
    arrays[key] = value
    path = tmp_path / f"bad{suffix}"
    if suffix == ".onnx_adapter":
        import onnxruntime as ort  # not write_adapter_file: it casts to float32, and the dtype case must not

        adapter = ort.AdapterFormat()
        adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                                for k, v in arrays.items()})
        adapter.export_adapter(str(path))
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    return path


HOSTILE_SCALES = [
    ("dora", f"{QUERY}.{SCALE_OUT}", np.ones(5, np.float32), r"has shape \(5,\)"),
    ("dora", f"{QUERY}.{SCALE_OUT}", np.full(32, np.nan, np.float32), "contains NaN or Inf"),
    ("ia3", f"{FFN_OUT}.{SCALE_IN}", np.ones((37, 1), np.float32), r"has shape \(37, 1\)"),
    ("ia3", f"{FFN_OUT}.{SCALE_IN}", np.ones(37, np.float16), "has dtype float16, expected float32"),
    ("attn", f"encoder.layer.0.attention.self.key.{SCALE_OUT}", np.ones(32, np.float32),
     "is not a LoRA input of this graph"),
]


@pytest.mark.parametrize("name, key, value, message", HOSTILE_SCALES)
def test_hostile_scale_tensors_are_refused_naming_the_key(model, name, key, value, message, tmp_path):
    path = _tampered(name, key, value, ".onnx_adapter", tmp_path)
    with pytest.raises(ConfigError, match=f"'{key}'.*{message}|{message}.*'{key}'|'{key}' {message}"):
        model.load_adapter(path, "bad")
    assert "bad" not in model.list_adapters()


def test_scale_checks_without_a_backend():
    slot = Slot(QUERY, 32, 32, (SCALE_OUT,))
    ok = {slot.input_a: np.zeros((32, 2), np.float32), slot.input_b: np.zeros((2, 32), np.float32),
          slot.scale_input(SCALE_OUT): np.ones(32, np.float32)}
    assert check_factor_arrays([slot], ok, "f") == {QUERY: 2}
    assert check_factor_arrays([slot], {slot.scale_input(SCALE_OUT): np.ones(32, np.float32)}, "f") == {}
    with pytest.raises(ConfigError, match=r"'encoder.layer.0.attention.self.query.lora_scale_out' contains NaN"):
        check_factor_arrays([slot], {**ok, slot.scale_input(SCALE_OUT): np.full(32, np.inf, np.float32)}, "f")
    assert Slot.from_dict(slot.to_dict()) == slot
    assert "scales" not in Slot(QUERY, 32, 32).to_dict()  # plain LoRA slots are written as before
    with pytest.raises(ConfigError, match="scales must be a list of"):
        Slot.from_dict({**slot.to_dict(), "scales": ["lora_scale_sideways"]})


def test_an_adapter_needing_a_scale_the_graph_lacks_is_refused():
    plain = [Slot(QUERY, 32, 32)]
    branch = Branch(np.zeros((2, 32), np.float32), np.zeros((32, 2), np.float32), {SCALE_POST: np.ones(32)})
    with pytest.raises(ConfigError, match=r"scales 'encoder.layer.0.attention.self.query' per channel "
                                          r"\(lora_scale_post\), and this switchable graph has no such input"):
        pack_factors(plain, {QUERY: branch})


def test_load_adapter_refuses_a_dora_folder_it_cannot_convert_without_the_base(model):
    with pytest.raises(ConfigError, match="needs the base model's weights .*DoRA divides by the norm"):
        model.load_adapter(str(method_adapter("dora")), "dora2")
    model.load_adapter(str(method_adapter("ia3")), "ia3_again")  # IA3 needs no base weights: converted on the fly
    assert max_unit_diff(model.encode(TEXTS, adapter="ia3_again"), eager("ia3")) <= ATOL
    model.delete_adapter("ia3_again")


@pytest.mark.slow
@pytest.mark.parametrize("name", [*METHODS, "attn", None])
def test_openvino_mixed_methods_equal_eager_peft_and_onnx_runtime(model, name):
    pytest.importorskip("openvino")
    ov = EmbeddingModel(mixed_openvino_export())
    adapter = name if name is not None else False
    got = ov.encode(TEXTS, adapter=adapter)
    assert max_unit_diff(got, model.encode(TEXTS, adapter=adapter)) <= ATOL
    if name in METHODS:
        assert max_unit_diff(got, eager(name)) <= ATOL
        validation = _entry(mixed_openvino_export(), name)["validation"]
        assert validation["vs_eager_peft"]["max_abs_diff"]["sentence_embedding"] <= ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name, key, value, message", HOSTILE_SCALES[:2])
def test_openvino_refuses_hostile_scale_tensors(name, key, value, message, tmp_path):
    pytest.importorskip("openvino")
    ov = EmbeddingModel(mixed_openvino_export())
    path = _tampered(name, key, value, ".safetensors", tmp_path)
    with pytest.raises(ConfigError, match=message):
        ov.load_adapter(path, "bad")


@pytest.mark.slow
def test_the_plain_lora_graph_gives_the_same_lora_and_base_results():
    from switchable_fixtures import switchable_export

    plain, mixed = EmbeddingModel(switchable_export()), EmbeddingModel(mixed_export())
    assert max_unit_diff(plain.encode(TEXTS, adapter="attn"), mixed.encode(TEXTS, adapter="attn")) <= 1e-6
    assert max_unit_diff(plain.encode(TEXTS, adapter=False), mixed.encode(TEXTS, adapter=False)) <= 1e-6


LATE_DORA = dict(r=2, lora_alpha=4, target_modules=["query", "value"], use_dora=True)


def _eager_folder(folder: Path) -> np.ndarray:
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(base_model()), device="cpu")
    model[0].auto_model = PeftModel.from_pretrained(model[0].auto_model, str(folder))
    return model.eval().encode(TEXTS, batch_size=3)


@pytest.mark.slow
def test_add_adapter_takes_a_dora_adapter_where_the_graph_has_its_scale(tmp_path):
    from switchable_fixtures import copy_export

    from peft_export.export.switchable_changes import add_adapter

    folder = copy_export(mixed_export(), tmp_path / "export")
    late = make_adapter("late-dora", **LATE_DORA)
    entry = add_adapter(folder, f"late={late}", log=quiet)
    assert entry["scales"] == {m: [SCALE_OUT] for m in entry["modules"]}
    assert entry["validation"]["vs_eager_peft"]["max_abs_diff"]["sentence_embedding"] <= ATOL
    assert max_unit_diff(EmbeddingModel(folder).encode(TEXTS, adapter="late"), _eager_folder(late)) <= ATOL


@pytest.mark.slow
def test_add_adapter_refuses_a_dora_adapter_on_a_graph_without_scale_inputs(tmp_path, capsys):
    from switchable_fixtures import copy_export, snapshot, switchable_export

    from peft_export.cli import main as cli_main

    folder = copy_export(switchable_export(), tmp_path / "export")  # plain LoRA adapters: no scale inputs
    before = snapshot(folder)
    code = cli_main(["add-adapter", str(folder), f"late={make_adapter('late-dora', **LATE_DORA)}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "per channel (lora_scale_out), and this switchable graph has no such input" in err, err
    assert snapshot(folder) == before


# ---- item 4: modules_to_save in switchable exports

SAVED_MODULE = "encoder.layer.1.output.dense"
SAVED_WEIGHT = f"{SAVED_MODULE}.weight.saved_value"


def saved_export(kind: str = "onnx") -> Path:
    """A LoRA adapter with a trained copy of a Dense layer (modules_to_save) beside a plain LoRA adapter."""
    from peft_export import export_onnx_model, export_openvino_model

    def build():
        out = ROOT / f"switchable-saved-{kind}"
        exporter = export_onnx_model if kind == "onnx" else export_openvino_model
        exporter(str(base_model()), out, adapters=[f"saved={method_adapter('lora_saved')}",
                                                   f"attn={make_adapter('attn')}"], switchable=True, log=quiet)
        return out

    return once(f"switchable-saved-{kind}", build)


def test_a_trained_module_copy_runs_per_adapter_and_equals_eager_peft():
    folder = saved_export()
    model = EmbeddingModel(folder)
    assert RuntimeConfig.load(folder).saved_params == [
        {"name": f"{SAVED_MODULE}.bias", "shape": [32]}, {"name": f"{SAVED_MODULE}.weight", "shape": [32, 37]}]
    entry = _entry(folder, "saved")
    assert entry["saved_params"] == [f"{SAVED_MODULE}.bias", f"{SAVED_MODULE}.weight"]
    assert entry["validation"]["vs_eager_peft"]["max_abs_diff"]["sentence_embedding"] <= ATOL
    got = model.encode(TEXTS, adapter="saved")
    assert max_unit_diff(got, eager("lora_saved")) <= ATOL
    validation = json.loads((folder / "peft_export.json").read_text())["validation"]
    assert validation["no_adapter_vs_base"]["max_abs_diff"]["sentence_embedding"] <= 1e-6  # no adapter: the base
    arrays = model.backend.read_adapter(folder / _entry(folder, "attn")["file"])
    assert not [n for n in arrays if "saved" in n]  # the other adapter runs the base's Dense layer
    switched = {n: model.encode(TEXTS, adapter=n) for n in ("saved", "attn")}
    model.merge_adapter(["saved", "attn"])
    for name, expected in switched.items():
        assert max_unit_diff(model.encode(TEXTS, adapter=name), expected) <= 1e-6, name


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update({SAVED_WEIGHT: np.ones((37, 32), np.float32)}), r"has shape \(37, 32\), expected \(32, 37\)"),
    (lambda a: a.update({SAVED_WEIGHT: np.full((32, 37), np.nan, np.float32)}), "contains NaN or Inf"),
    (lambda a: a.pop(f"{SAVED_MODULE}.weight.saved_use"), "'encoder.layer.1.output.dense.weight.saved_use' is missing"),
    (lambda a: a.update({f"{SAVED_MODULE}.weight.saved_use": np.full(1, 0.5, np.float32)}), "expected 0 or 1"),
])
def test_hostile_saved_copies_are_refused_naming_the_key(change, message, tmp_path):
    import onnxruntime as ort

    from peft_export.runtime.onnxruntime_adapters import read_adapter_arrays

    folder = saved_export()
    arrays = read_adapter_arrays(folder / _entry(folder, "saved")["file"])
    change(arrays)
    path = tmp_path / "bad.onnx_adapter"
    adapter = ort.AdapterFormat()
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    adapter.export_adapter(str(path))
    with pytest.raises(ConfigError, match=message):
        EmbeddingModel(folder).load_adapter(path, "bad")


def test_saved_copies_over_the_size_limit_or_on_a_branched_layer_are_refused(tmp_path, monkeypatch):
    from peft_export import export_onnx_model
    from peft_export.export import switchable_adapters

    spec = f"saved={method_adapter('lora_saved')}"
    monkeypatch.setattr(switchable_adapters, "MAX_SAVED_ELEMENTS", 1000)
    with pytest.raises(ConfigError, match=r"trains full copies of 1 module\(s\) \(modules_to_save\) with 1,216 values "
                                          r"\('encoder.layer.1.output.dense': 1,216\).*allows 1,000 values.*Export "
                                          r"this adapter merged instead"):
        export_onnx_model(str(base_model()), tmp_path / "big", adapters=[spec], switchable=True, log=quiet)
    monkeypatch.undo()
    # IA3 on the feed-forward output.dense puts a branch (an input scale) on the module the copy replaces.
    with pytest.raises(ConfigError, match=r"trains its own copy of 'encoder.layer.1.output.dense'.*low-rank branch "
                                          r"on 'encoder.layer.1.output.dense'"):
        export_onnx_model(str(base_model()), tmp_path / "clash", adapters=[spec, f"ia3={method_adapter('ia3')}"],
                          switchable=True, log=quiet)
    assert not (tmp_path / "big").exists() and not (tmp_path / "clash").exists()


@pytest.mark.slow
def test_openvino_runs_the_trained_module_copy_per_adapter():
    pytest.importorskip("openvino")
    ov, onnx_model = EmbeddingModel(saved_export("openvino")), EmbeddingModel(saved_export())
    assert max_unit_diff(ov.encode(TEXTS, adapter="saved"), eager("lora_saved")) <= ATOL
    for name in ("saved", "attn", False):
        assert max_unit_diff(ov.encode(TEXTS, adapter=name), onnx_model.encode(TEXTS, adapter=name)) <= ATOL


def test_a_stack_with_a_scaled_adapter_is_refused_and_plain_lora_still_stacks(model):
    """Run-time stacks add LoRA branches; a DoRA or IA3 adapter's scale vectors do not add up, so a stack holding
    one is refused naming the scale input, and the model keeps its previous active adapter."""
    model.set_adapter("attn")
    for scaled in ("dora", "ia3"):
        with pytest.raises(ConfigError, match=rf"Adapter '{scaled}' carries '[^']+\.lora_scale_(in|out|post)', which "
                                              r"is not a LoRA factor .* export the adapters merged with "
                                              r"--stack-adapters"):
            model.encode(TEXTS, adapter=["attn", scaled])
    assert model.active_adapters() == ["attn"]
    np.testing.assert_allclose(model.encode(TEXTS, adapter=["attn"]), model.encode(TEXTS, adapter="attn"), atol=1e-6)
