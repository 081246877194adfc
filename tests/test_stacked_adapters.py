"""Issue 26 item 5: several adapters at once, as PEFT runs them (``base_model.set_adapter(["a", "b"])``).

Merged: ``--stack-adapters`` / ``stack_adapters=True`` merges every given adapter, all active, into one model, equal
to eager PEFT with both active (1e-5), both recorded in the manifest; two adapters without it stay refused, now
naming both ways out. Switchable (LoRA): ``set_adapter([...])`` and ``encode(..., adapter=[...])`` run the adapters'
factors side by side along the graph's dynamic rank axis, equal to eager PEFT with both active."""

from __future__ import annotations

import numpy as np
import pytest
from switchable_fixtures import (TEXTS, base_model, edit_adapter_config, make_adapter, max_unit_diff, once, quiet,
                                 switchable_export)

from peft_export import AdapterNotFoundError, ConfigError, EmbeddingModel, export_onnx_model
from peft_export.cli import main as cli_main

ATOL = 1e-5


def eager(*names: str) -> np.ndarray:
    """sentence-transformers whose encoder PEFT loaded every named adapter into, all of them active."""
    def build():
        from peft import PeftModel
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(base_model()), device="cpu")
        first, *rest = names
        peft_model = PeftModel.from_pretrained(model[0].auto_model, str(make_adapter(first)), adapter_name=first)
        for name in rest:
            peft_model.load_adapter(str(make_adapter(name)), adapter_name=name)
        peft_model.base_model.set_adapter(list(names))
        model[0].auto_model = peft_model
        return model.eval().encode(TEXTS, batch_size=3)

    return once(f"eager-stack-{'+'.join(names)}", build)


def _specs(*names: str) -> list[str]:
    return [f"{n}={make_adapter(n)}" for n in names]


# ---- merged: --stack-adapters

def test_merged_export_of_two_stacked_adapters_equals_eager_peft_with_both_active(tmp_path):
    result = export_onnx_model(str(base_model()), tmp_path / "out", adapters=_specs("attn", "mixed"),
                               stack_adapters=True, log=quiet)
    manifest = result.manifest
    assert [a["name"] for a in manifest["adapters"]] == ["attn", "mixed"]
    assert manifest["stacked_adapters"] == ["attn", "mixed"] and manifest["merge_mode"] == "merged"
    assert manifest["validation"]["merged_vs_unmerged"]["sentence_embedding"] <= ATOL
    got = EmbeddingModel(tmp_path / "out").encode(TEXTS)
    assert max_unit_diff(got, eager("attn", "mixed")) <= ATOL
    assert max_unit_diff(got, eager("attn")) > 1e-3 and max_unit_diff(got, eager("mixed")) > 1e-3  # both count


def test_info_says_which_adapters_were_stacked(tmp_path, capsys):
    assert cli_main(["merge-onnx", str(base_model()), "--adapter", f"attn={make_adapter('attn')}", "--adapter",
                     f"ffn={make_adapter('ffn')}", "--stack-adapters", "-o", str(tmp_path / "out")]) == 0
    assert max_unit_diff(EmbeddingModel(tmp_path / "out").encode(TEXTS), eager("attn", "ffn")) <= ATOL
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "merge mode:  merged (stacked: attn + ffn, all active)" in out
    assert sum(line.startswith("adapter:") for line in out.splitlines()) == 2


@pytest.mark.parametrize("extra, message", [
    ([], r"A merged export takes one adapter, 2 were given \(attn, ffn\); export each separately, pass --switchable "
         r"to keep them as switchable adapters over one base graph, or --stack-adapters to merge them all into one "
         r"model \(PEFT with every adapter active at once\)$"),
    (["--stack-adapters", "--switchable"], r"--stack-adapters merges adapters and cannot be combined with "
                                           r"--switchable; a switchable export .* set_adapter\(\[a, b\]\)"),
])
def test_ambiguous_uses_of_several_adapters_are_refused_exit_2(extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(["merge-onnx", str(base_model()), *sum((["--adapter", s] for s in _specs("attn", "ffn")), []),
                     *extra, "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not out.exists()
    assert pytest.importorskip("re").search(message, err[0]), err[0]


def test_stacking_one_adapter_or_mixed_methods_is_refused(tmp_path, capsys):
    code = cli_main(["merge-onnx", str(base_model()), "--adapter", f"attn={make_adapter('attn')}",
                     "--stack-adapters", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--stack-adapters stacks two or more adapters, 1 given (attn); pass --adapter NAME=PATH " \
                         "for each, or drop --stack-adapters" in err
    ia3 = edit_adapter_config(make_adapter("ffn"), tmp_path / "ia3", peft_type="IA3")
    with pytest.raises(ConfigError, match=r"Stacked adapters must share one PEFT method \(attn: LORA, other: IA3\): "
                                          r"PEFT runs a stack of one method's adapters"):
        export_onnx_model(str(base_model()), tmp_path / "out", adapters=[f"attn={make_adapter('attn')}",
                                                                         f"other={ia3}"], stack_adapters=True,
                          log=quiet)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_merged_openvino_export_of_stacked_adapters_equals_eager_peft(tmp_path):
    pytest.importorskip("openvino")
    from peft_export import export_openvino_model

    result = export_openvino_model(str(base_model()), tmp_path / "ov", adapters=_specs("attn", "mixed"),
                                   stack_adapters=True, log=quiet)
    assert result.manifest["stacked_adapters"] == ["attn", "mixed"]
    assert max_unit_diff(EmbeddingModel(tmp_path / "ov").encode(TEXTS), eager("attn", "mixed")) <= ATOL


# ---- switchable (LoRA): several adapters active at run time

@pytest.fixture(scope="module")
def model():
    return EmbeddingModel(switchable_export())


def test_set_adapter_with_a_list_runs_both_adapters_as_eager_peft_does(model):
    model.set_adapter(["attn", "mixed"])
    try:
        assert model.active_adapters() == ["attn", "mixed"] and model.active_adapter() == ["attn", "mixed"]
        assert max_unit_diff(model.encode(TEXTS), eager("attn", "mixed")) <= ATOL
        model.disable_adapters()
        assert max_unit_diff(model.encode(TEXTS), model.encode(TEXTS, adapter=False)) == 0
        model.enable_adapters()
        assert max_unit_diff(model.encode(TEXTS), eager("attn", "mixed")) <= ATOL
    finally:
        model.set_adapter("attn")
    assert model.active_adapters() == ["attn"] and max_unit_diff(model.encode(TEXTS), eager("attn")) <= ATOL


@pytest.mark.parametrize("names", [["attn", "ffn"], ["ffn", "mixed"], ["attn", "ffn", "mixed"]])
def test_encode_with_a_list_of_adapters_equals_eager_peft_and_leaves_the_state_alone(model, names):
    before = model.active_adapters()
    assert max_unit_diff(model.encode(TEXTS, adapter=names), eager(*names)) <= ATOL
    assert model.active_adapters() == before
    assert max_unit_diff(model.encode(TEXTS, adapter=names[:1]), model.encode(TEXTS, adapter=names[0])) == 0


def test_a_stack_of_merged_adapters_still_equals_eager_peft(tmp_path):
    model = EmbeddingModel(switchable_export())
    model.merge_adapter(["attn"])
    assert max_unit_diff(model.encode(TEXTS, adapter=["attn", "mixed"]), eager("attn", "mixed")) <= ATOL


def test_bad_stacks_are_refused_clearly(model):
    with pytest.raises(AdapterNotFoundError, match=r"Adapter with name 'nope' not found"):
        model.set_adapter(["attn", "nope"])
    with pytest.raises(ConfigError, match=r"set_adapter takes an adapter name or a list of distinct adapter names, "
                                          r"found \['attn', 'attn'\]"):
        model.set_adapter(["attn", "attn"])
    with pytest.raises(ConfigError, match=r"encode\(adapter=\.\.\.\) takes an adapter name or a list .* found \[\]"):
        model.encode(TEXTS, adapter=[])


def test_state_dict_and_delete_with_a_stack_active(tmp_path):
    model = EmbeddingModel(switchable_export())
    model.set_adapter(["attn", "ffn", "mixed"])
    with pytest.raises(ConfigError, match=r"Several adapters are active together \(attn, ffn, mixed\); pass "
                                          r"adapter_name"):
        model.get_adapter_state_dict()
    with pytest.raises(ConfigError, match=r"pass adapter_names to merge_adapter\(\), which takes each adapter"):
        model.merge_adapter()
    model.delete_adapter("ffn")
    assert model.active_adapters() == ["attn", "mixed"]
    assert max_unit_diff(model.encode(TEXTS), eager("attn", "mixed")) <= ATOL
    model.delete_adapter("mixed")
    assert model.active_adapters() == ["attn"]


def test_adapters_with_scale_tensors_are_not_stacked():
    """Only LoRA factors add up side by side; a DoRA or IA3 scale vector (switchable exports of those methods are
    being added) is refused by name instead of being dropped."""
    from peft_export.runtime.adapter_stack import stack_factor_arrays
    from peft_export.runtime.lora_layout import Slot

    slot = Slot("enc.query", 4, 3)
    lora = {slot.input_a: np.ones((4, 2), np.float32), slot.input_b: np.ones((2, 3), np.float32)}
    stacked = stack_factor_arrays([slot], [("a", lora), ("b", {k: 2 * v for k, v in lora.items()})])
    assert stacked[slot.input_a].shape == (4, 4) and stacked[slot.input_b].shape == (4, 3)
    x = np.arange(4, dtype=np.float32)
    assert np.allclose(x @ stacked[slot.input_a] @ stacked[slot.input_b], x @ lora[slot.input_a] @ lora[
        slot.input_b] + x @ (2 * lora[slot.input_a]) @ (2 * lora[slot.input_b]))
    dora = {**lora, "enc.query.lora_scale": np.ones(3, np.float32)}
    with pytest.raises(ConfigError, match=r"Adapter 'b' carries 'enc\.query\.lora_scale', which is not a LoRA factor "
                                          r"\(a scale vector, as DoRA and IA3 adapters have\): only plain LoRA"):
        stack_factor_arrays([slot], [("a", lora), ("b", dora)])
