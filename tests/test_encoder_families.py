"""Encoder families people LoRA-tune, in every export mode: XLM-R (bge-m3 / multilingual-e5 layout, CLS pooling,
e5 prompts), MPNet (all-mpnet-base-v2 layout, mean pooling) and ModernBERT (gte-modernbert layout, CLS pooling,
local attention). Each tiny model (tests/fixtures/encoder_families.py) is exported once per session in each mode
(merged ONNX, switchable ONNX, merged OpenVINO, switchable OpenVINO) and must equal sentence-transformers with the
PEFT adapter loaded within 1e-5 at batch 1 and in mixed batches, with the family's prompts; a switchable export with
no adapter equals the base within 1e-6."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCE_ATOL, max_unit_diff
from fixtures.build_once import BuiltOnce
from fixtures import text
from fixtures.encoder_families import FAMILIES, MODERNBERT_LOCAL_WINDOW, build_adapter, build_hf, build_st
from fixtures.export_edits import write_runtime_config

BASE_ATOL = 1e-6
ADAPTER = "tuned"
# OpenVINO conversion takes several seconds per export: the OpenVINO modes run in the slow suite.
MODES = ["merged-onnx", "switchable-onnx", pytest.param("merged-openvino", marks=pytest.mark.slow),
         pytest.param("switchable-openvino", marks=pytest.mark.slow)]
# Multilingual and mixed-length real text: XLM-R's tokenizer sees other scripts, ModernBERT's local window (8
# tokens) is far shorter than most of these.
EXTRA_TEXTS = ["Émigré café naïve résumé", "東京は日本の首都です。", "مرحبا بالعالم", "Hi", "",
               " ".join(["Long inputs are truncated to the model's maximum sequence length."] * 10)]


def _quiet(msg: str) -> None:
    pass


class FamilyCase(BuiltOnce):
    """One family's base, adapter, references and exports; each built on first use, once per session."""

    def __init__(self, name: str, root: Path, tokenizer_texts: list[str]):
        self.family = FAMILIES[name]
        self.root = root
        self._tokenizer_texts = tokenizer_texts
        super().__init__()

    @property
    def base(self) -> Path:
        def build() -> Path:
            hf = build_hf(self.family, self.root / "hf", self._tokenizer_texts)
            return build_st(self.family, hf, self.root / "st")
        return self._once("base", build)

    @property
    def adapter(self) -> Path:
        return self._once("adapter", lambda: build_adapter(self.family, self.base, self.root / "adapter"))

    def reference(self, with_adapter: bool = True):
        from fixtures.tiny_models import st_reference

        key = f"reference-{with_adapter}"
        return self._once(key, lambda: st_reference(self.base, self.adapter if with_adapter else None))

    def export(self, mode: str) -> Path:
        def build() -> Path:
            from peft_export import export_onnx_model, export_openvino_model

            exporter = export_openvino_model if mode.endswith("openvino") else export_onnx_model
            out = self.root / mode
            if mode.startswith("switchable"):
                exporter(str(self.base), out, adapters=[f"{ADAPTER}={self.adapter}"], switchable=True, log=_quiet)
            else:
                exporter(str(self.adapter), out, base=str(self.base), log=_quiet)
            return out
        return self._once(mode, build)

    def model(self, mode: str):
        from peft_export import EmbeddingModel

        return self._once(f"model-{mode}", lambda: EmbeddingModel(self.export(mode)))


_CASES: dict[str, FamilyCase] = {}


@pytest.fixture(scope="session", params=list(FAMILIES))
def family_case(request, tmp_path_factory) -> FamilyCase:
    name = request.param
    if name not in _CASES:
        texts = text.FALLBACK_SENTENCES + text.real_sentences(400, seed=1) + EXTRA_TEXTS
        _CASES[name] = FamilyCase(name, tmp_path_factory.mktemp(f"family-{name}"), texts)
    return _CASES[name]


@pytest.fixture(scope="session")
def family_texts(real_texts) -> list[str]:
    """Mixed lengths: a short and a long text in most batches of 8."""
    return real_texts[:26] + EXTRA_TEXTS


# MPNet (relative position bias) and XLM-R: packed Attention; ModernBERT (rotary, local window): MultiHeadAttention.
FUSED_ATTENTION = {"xlm-roberta": ("Attention", 2), "mpnet": ("Attention", 2), "modernbert": ("MultiHeadAttention", 3)}


def _prompt_names(case: FamilyCase) -> list[str | None]:
    return [None, *case.family.prompts]


def _encode(model, texts, mode: str, **kwargs):
    if mode.startswith("switchable"):
        kwargs["adapter"] = ADAPTER
    return model.encode(texts, **kwargs)


def _check_parity(case: FamilyCase, mode: str, texts: list[str]) -> dict[str, float]:
    model, reference = case.model(mode), case.reference()
    diffs = {}
    for prompt_name in _prompt_names(case):
        expected = reference.encode(texts, batch_size=8, prompt_name=prompt_name)
        got = _encode(model, texts, mode, batch_size=8, prompt_name=prompt_name)
        diffs[f"batch 8, prompt {prompt_name}"] = max_unit_diff(got, expected)
        singles = texts[:3] + texts[-2:]
        got_one = np.stack([_encode(model, t, mode, prompt_name=prompt_name) for t in singles])
        expected_one = np.stack([reference.encode(t, prompt_name=prompt_name) for t in singles])
        diffs[f"batch 1, prompt {prompt_name}"] = max_unit_diff(got_one, expected_one)
    return diffs


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_equals_sentence_transformers_with_the_adapter(family_case, mode, family_texts):
    if mode.endswith("openvino"):
        pytest.importorskip("openvino", reason="openvino is not installed (pip install 'peft_export[openvino]')")
    diffs = _check_parity(family_case, mode, family_texts)
    assert max(diffs.values()) < SENTENCE_ATOL, diffs
    # The adapter matters: the export is not simply the base.
    base = family_case.reference(with_adapter=False).encode(family_texts[:8])
    assert max_unit_diff(_encode(family_case.model(mode), family_texts[:8], mode), base) > 1e-3
    if mode == "merged-onnx":  # this parity is the fused graph's: one fused operator per layer
        fusion = json.loads((family_case.export(mode) / "peft_export.json").read_text())["validation"][
            "attention_fusion"]
        op, layers = FUSED_ATTENTION[family_case.family.name]
        assert fusion["applied"] is True and fusion["fused_operators"][op] == layers


@pytest.mark.parametrize("mode", ["switchable-onnx", pytest.param("switchable-openvino", marks=pytest.mark.slow)])
def test_switchable_without_adapter_equals_the_base(family_case, mode, family_texts):
    if mode.endswith("openvino"):
        pytest.importorskip("openvino", reason="openvino is not installed (pip install 'peft_export[openvino]')")
    model, base = family_case.model(mode), family_case.reference(with_adapter=False)
    for prompt_name in _prompt_names(family_case):
        got = model.encode(family_texts, batch_size=8, adapter=False, prompt_name=prompt_name)
        assert max_unit_diff(got, base.encode(family_texts, batch_size=8, prompt_name=prompt_name)) < BASE_ATOL


def test_family_layout_is_what_the_hub_ships(family_case):
    """The tiny model is the family's real layout: class, tokenizer, pooling, prompts, ST file layout."""
    import json

    base, family = family_case.base, family_case.family
    reference = family_case.reference()
    assert type(reference[0].auto_model).__name__ == family.model_class
    assert reference[1].pooling_mode == family.pooling
    modules = (base / "modules.json").read_text()
    bert_config = json.loads((base / "sentence_bert_config.json").read_text())
    if family.legacy_layout:
        assert "sentence_transformers.models.Transformer" in modules and bert_config["max_seq_length"] == 64
    else:
        assert "sentence_transformers.base.modules" in modules and "max_seq_length" not in bert_config
    assert {k: v for k, v in reference.prompts.items() if v} == family.prompts
    targets = json.loads((family_case.adapter / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == sorted(family.target_modules)


def test_modernbert_local_attention_changes_the_output(family_texts):
    """The tests' sequences are longer than ModernBERT's local window, so a graph that attended globally in the
    local layer would fail the parity above."""
    case = _CASES.get("modernbert")
    if case is None:
        pytest.skip("the modernbert family case was not built in this session")
    import torch

    reference = case.reference(with_adapter=False)
    config = reference[0].auto_model.config
    assert "sliding_attention" in config.layer_types
    assert max(len(reference.tokenize([t])["input_ids"][0]) for t in family_texts) > 2 * MODERNBERT_LOCAL_WINDOW
    local = reference.encode(family_texts)
    saved = config.sliding_window
    try:
        config.sliding_window = 10_000  # the mask builder reads it at each call: every layer now sees all tokens
        with torch.no_grad():
            global_only = reference.encode(family_texts)
    finally:
        config.sliding_window = saved
    assert max_unit_diff(local, global_only) > 1e-3


@pytest.fixture(scope="module")
def promptless_mpnet(tmp_path_factory, real_texts):
    """all-mpnet-base-v2 as its hub files are: config_sentence_transformers.json without any prompts."""
    import json
    import shutil

    case = _CASES.get("mpnet") or FamilyCase("mpnet", tmp_path_factory.mktemp("family-mpnet"),
                                              text.FALLBACK_SENTENCES + text.real_sentences(400, seed=1))
    root = tmp_path_factory.mktemp("promptless")
    base = shutil.copytree(case.base, root / "base")
    st_config = base / "config_sentence_transformers.json"
    st_config.write_text(json.dumps({k: v for k, v in json.loads(st_config.read_text()).items() if k != "prompts"}))
    return case, base


@pytest.mark.parametrize("switchable", [False, True], ids=["merged", "switchable"])
def test_query_and_document_prompt_names_work_without_saved_prompts(promptless_mpnet, tmp_path, switchable,
                                                                   family_texts):
    """sentence-transformers 6.x gives every model empty "query" and "document" prompts; so do exports and the
    runtime, for new exports and for ones written before the defaults were recorded."""
    import json
    import shutil

    from fixtures.tiny_models import st_reference

    from peft_export import EmbeddingModel, export_onnx_model

    case, base = promptless_mpnet
    reference = st_reference(base, case.adapter)
    assert reference.prompts == {"query": "", "document": ""}
    spec = f"{ADAPTER}={case.adapter}" if switchable else str(case.adapter)
    out = tmp_path / "export"
    export_onnx_model(str(base), out, adapters=[spec], switchable=switchable, log=_quiet)
    assert json.loads((out / "embedding_config.json").read_text())["prompts"] == {"query": "", "document": ""}
    old = shutil.copytree(out, tmp_path / "old-export")  # as exports made before: no prompts recorded
    config = json.loads((old / "embedding_config.json").read_text())
    write_runtime_config(old, {**config, "prompts": {}})
    mode = "switchable-onnx" if switchable else "merged-onnx"
    expected = reference.encode(family_texts, prompt_name="query")
    np.testing.assert_array_equal(expected, reference.encode(family_texts))
    for folder in (out, old):
        model = EmbeddingModel(folder)
        assert model.prompts == {"query": "", "document": ""}
        for name in ("query", "document"):
            got = _encode(model, family_texts, mode, prompt_name=name)
            assert max_unit_diff(got, expected) < SENTENCE_ATOL
        with pytest.raises(ValueError, match=r"Prompt name 'passage' not found; the model has prompts "
                                             r"\['document', 'query'\]"):
            model.encode(family_texts[:1], prompt_name="passage")
