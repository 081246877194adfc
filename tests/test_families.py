"""Decoder-based embedding families (Qwen3-Embedding, EmbeddingGemma, e5-mistral layouts) in every export mode, the
family registry, Gemma3's traceable bidirectional masks, and the error for a model that cannot be traced.

Each family is a tiny model in its hub layout (tests/fixtures/family_models.py) with LoRA on the seven projections;
every export must equal sentence-transformers with the adapter loaded (1e-5, batch 1 and mixed batches, with each
of the family's prompts), while the runtime pads on the right and sentence-transformers on the left.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from fixtures import family_models, text, tiny_models
from peft_export import EmbeddingModel, ToolError
from peft_export.export.families import FAMILIES, family_for

SENTENCE_ATOL = 1e-5
BASE_ATOL = 1e-6
# One mode per family in the default run (each covers one of the fixes); the other nine are marked slow.
DEFAULT_CASES = {("qwen3", "merged-openvino"), ("gemma3", "merged-onnx"), ("mistral", "switchable-onnx")}
LONG_TEXT = " ".join(text.FALLBACK_SENTENCES[:12])  # well over MAX_SEQ_LENGTH tokens: truncation


@dataclass
class FamilyCase:
    family: str
    root: Path
    base: Path
    adapter: Path
    exports: dict[str, Path] = field(default_factory=dict)
    references: dict[str, object] = field(default_factory=dict)

    def export(self, mode: str) -> Path:
        if mode not in self.exports:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.exports[mode] = family_models.export_family(mode, self.base, self.adapter,
                                                                 self.root / f"export-{mode}")
        return self.exports[mode]

    def reference(self, with_adapter: bool = True):
        key = "adapter" if with_adapter else "base"
        if key not in self.references:
            self.references[key] = tiny_models.st_reference(self.base, self.adapter if with_adapter else None)
        return self.references[key]


def _build(family: str, root: Path) -> FamilyCase:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        texts = text.FALLBACK_SENTENCES + text.real_sentences(200, seed=1)
        base = family_models.build_family_model(family, root / "base", texts)
        adapter = family_models.add_family_adapter(base, root / "adapter", family)
    return FamilyCase(family, root, base, adapter)


@pytest.fixture(scope="session")
def qwen3_family(tmp_path_factory) -> FamilyCase:
    return _build("qwen3", tmp_path_factory.mktemp("family-qwen3"))


@pytest.fixture(scope="session")
def gemma3_family(tmp_path_factory) -> FamilyCase:
    return _build("gemma3", tmp_path_factory.mktemp("family-gemma3"))


@pytest.fixture(scope="session")
def mistral_family(tmp_path_factory) -> FamilyCase:
    return _build("mistral", tmp_path_factory.mktemp("family-mistral"))


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> FamilyCase:
    return _build("llama", tmp_path_factory.mktemp("family-llama"))


@pytest.fixture(scope="module")
def parity_texts(real_texts) -> list[str]:
    return real_texts[:14] + [LONG_TEXT, "ok"]


def _cases():
    for family in family_models.FAMILIES:
        for mode in family_models.MODES:
            marks = [] if (family, mode) in DEFAULT_CASES else [pytest.mark.slow]
            yield pytest.param(family, mode, marks=marks, id=f"{family}-{mode}")


# -- registry ------------------------------------------------------------------------------------------------------


def test_registry_entries():
    assert family_for("qwen3").name == "qwen3" and family_for("mistral").name == "llama"
    assert family_for("gemma3_text").name == "gemma3"
    for model_type in ("roberta", "xlm-roberta", "mpnet"):
        assert family_for(model_type).position_offset == 2
    assert family_for("bert").position_offset == 0 and family_for("no-such-type").name == "bert-like"
    decoder = family_for("qwen3")
    assert decoder.load_kwargs() == {"attn_implementation": "eager", "use_cache": False}
    assert decoder.padding_side == "left" and decoder.pooling == "lasttoken"
    assert not decoder.bert_optimizer and family_for("bert").bert_optimizer  # rotary models: the rewrite alone
    assert family_for("bert").load_kwargs() == {"attn_implementation": "eager"}
    types = [t for family in FAMILIES for t in family.model_types]
    assert len(types) == len(set(types))  # each model type has exactly one entry


def test_ffn_part_names_the_feed_forward_projections():
    bert, qwen3, modernbert = family_for("bert"), family_for("qwen3"), family_for("modernbert")
    assert bert.ffn_part("/encoder/encoder/layer.3/output/dense/MatMul") == "output"
    assert bert.ffn_part("/encoder/encoder/layer.3/intermediate/dense/MatMul") == "input"
    assert bert.ffn_part("/encoder/encoder/layer.3/attention/output/dense/MatMul") is None
    assert bert.ffn_part("__module.encoder.encoder.layer.3.output.dense/aten::linear/MatMul") == "output"
    assert qwen3.ffn_part("/encoder/layers.0/mlp/down_proj/MatMul") == "output"
    assert qwen3.ffn_part("__module.encoder.layers.0.mlp.up_proj/aten::linear/MatMul") == "input"
    assert qwen3.ffn_part("/encoder/layers.0/self_attn/o_proj/MatMul") is None
    assert modernbert.ffn_part("/encoder/layers.1/mlp/Wo/MatMul") == "output"
    assert modernbert.ffn_part("/encoder/layers.1/attn/Wo/MatMul") is None


def test_ffn_projections_are_found_in_exported_graphs(qwen3_family, gemma3_family):
    """The int8 ladders keep FFN projections in float by these names: they must match the graphs as written."""
    import onnx
    import openvino as ov

    from peft_export.export.openvino import _weight_matmuls

    ir = ov.Core().read_model(str(qwen3_family.export("merged-openvino") / "openvino_model.xml"))
    graph = onnx.load(str(gemma3_family.export("merged-onnx") / "model.onnx"), load_external_data=False)
    onnx_matmuls = [node.name for node in graph.graph.node if node.op_type == "MatMul"]
    for case, names in ((qwen3_family, _weight_matmuls(ir)), (gemma3_family, onnx_matmuls)):
        config = json.loads((case.base / "config.json").read_text())
        parts = [family_for(config["model_type"]).ffn_part(name) for name in names]
        layers = config["num_hidden_layers"]
        assert (parts.count("output"), parts.count("input")) == (layers, 2 * layers), names


def test_fixture_layouts_match_the_registry(qwen3_family, gemma3_family, mistral_family):
    for case in (qwen3_family, gemma3_family, mistral_family):
        config = json.loads((case.base / "config.json").read_text())
        entry = family_for(config["model_type"])
        tokenizer_config = json.loads((case.base / "tokenizer_config.json").read_text())
        assert tokenizer_config["padding_side"] == entry.padding_side
        adapter_config = json.loads((case.adapter / "adapter_config.json").read_text())
        assert set(adapter_config["target_modules"]) == set(entry.lora_targets)
        pooling = json.loads((case.base / "1_Pooling" / "config.json").read_text())
        assert pooling["pooling_mode"] == entry.pooling
    assert json.loads((gemma3_family.base / "config.json").read_text())["use_bidirectional_attention"] is True
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((gemma3_family.base / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]


# -- Gemma3's bidirectional masks ----------------------------------------------------------------------------------


def test_gemma3_masks_equal_transformers_masks():
    """The traceable masks equal, element for element, the ones transformers builds (with torch.vmap) in eager mode,
    for the full-attention and the sliding-window layers, with left, right and no padding."""
    import torch
    from transformers import AutoModel, Gemma3TextConfig

    from peft_export.export.gemma3_masks import bidirectional_masks

    config = Gemma3TextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"], use_bidirectional_attention=True,
                              attn_implementation="eager")
    assert config.sliding_window == 3  # transformers' bidirectional adjustment of the stored window
    model = AutoModel.from_config(config).eval()
    seen = {}

    def capture(layer_type):
        def hook(module, args, kwargs):
            seen[layer_type] = kwargs["attention_mask"]
        return hook

    for layer, layer_type in zip(model.layers, config.layer_types):
        layer.register_forward_pre_hook(capture(layer_type), with_kwargs=True)
    mask = torch.ones(3, 11, dtype=torch.int64)
    mask[0, :4] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    with torch.no_grad():
        model(input_ids=torch.randint(1, 50, (3, 11)), attention_mask=mask)
    ours = bidirectional_masks(model.config, mask)
    for layer_type in ("full_attention", "sliding_attention"):
        assert torch.equal(ours[layer_type], seen[layer_type]), layer_type
    # The window matters: token 0 of the unpadded row sees tokens 0..2 in sliding layers, all 11 in full layers.
    assert int((ours["sliding_attention"][2, 0, 0] == 0).sum()) == 3
    assert int((ours["full_attention"][2, 0, 0] == 0).sum()) == 11


# -- parity in every mode ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,mode", list(_cases()))
def test_export_equals_sentence_transformers_with_adapter(family, mode, request, parity_texts):
    case: FamilyCase = request.getfixturevalue(f"{family}_family")
    model = EmbeddingModel(case.export(mode))
    prompts = [None, *family_models.FAMILIES[family].prompts]
    diffs = family_models.parity(case.reference(), model, parity_texts, prompts)
    assert max(diffs.values()) < SENTENCE_ATOL, diffs
    manifest = json.loads((case.export(mode) / "peft_export.json").read_text())
    if mode == "merged-onnx":  # rotary, grouped-query attention: one MultiHeadAttention per layer
        fusion = manifest["validation"]["attention_fusion"]
        assert fusion["applied"] is True and fusion["fused_operators"]["MultiHeadAttention"] == 2
        assert fusion["optimizer"] == "peft_export.export.attention_rewrite"
    if mode.startswith("switchable"):
        assert manifest["validation"]["no_adapter_vs_base"]["max_abs_diff"]["sentence_embedding"] <= BASE_ATOL
        base = case.reference(with_adapter=False)
        alone = max(family_models.max_unit_diff(model.encode([t], adapter=False), base.encode([t]))
                    for t in parity_texts[:6])
        assert alone < BASE_ATOL
        mixed = family_models.max_unit_diff(model.encode(parity_texts, batch_size=8, adapter=False),
                                            base.encode(parity_texts, batch_size=8))
        assert mixed < SENTENCE_ATOL  # ST pads on the left, the runtime on the right: same values up to rounding
    # The adapter matters: the export is not the base model.
    adapted = model.encode(parity_texts[:4])
    assert family_models.max_unit_diff(adapted, case.reference(with_adapter=False).encode(parity_texts[:4])) > 1e-3


def test_merge_adapter_on_a_switchable_decoder_equals_sentence_transformers(mistral_family, parity_texts):
    """merge_adapter builds a merged session of the decoder's base graph (rotary attention, last-token pooling,
    grouped-query heads): still sentence-transformers with the adapter, and unmerging gives the branches back."""
    model = EmbeddingModel(mistral_family.export("switchable-onnx"))
    branches = model.encode(parity_texts, batch_size=8)
    model.merge_adapter(family_models.ADAPTER_NAME)
    assert model.merged_adapters() == [family_models.ADAPTER_NAME]
    merged = model.encode(parity_texts, batch_size=8)
    assert family_models.max_unit_diff(merged, branches) < 1e-6
    prompts = [None, *family_models.FAMILIES["mistral"].prompts]
    assert max(family_models.parity(mistral_family.reference(), model, parity_texts, prompts).values()) < SENTENCE_ATOL
    model.unmerge_adapter()
    assert model.merged_adapters() == []
    assert family_models.max_unit_diff(model.encode(parity_texts, batch_size=8), branches) < 1e-6


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_runtime_reproduces_eos_and_truncation(family, request):
    """The tokenizer's post-processor appends EOS; the runtime's tokenization (right padded) holds the same ids as
    sentence-transformers' (left padded), truncated to max_seq_length with the EOS kept."""
    case: FamilyCase = request.getfixturevalue(f"{family}_family")
    model = EmbeddingModel(case.export("switchable-onnx" if family == "mistral" else "merged-openvino"))
    reference = case.reference()
    texts = [LONG_TEXT, "ok", "A short one."]
    ours = model.tokenize(texts)
    theirs = reference.tokenize(texts)
    eos = reference.tokenizer.convert_tokens_to_ids(
        "<|endoftext|>" if family == "qwen3" else reference.tokenizer.eos_token)
    for row in range(len(texts)):
        got = ours["input_ids"][row][ours["attention_mask"][row] == 1]
        want = theirs["input_ids"][row][theirs["attention_mask"][row] == 1].numpy()
        np.testing.assert_array_equal(got, want)
        assert got[-1] == eos
    assert ours["attention_mask"][0].sum() == tiny_models.MAX_SEQ_LENGTH
    assert theirs["attention_mask"][1, 0] == 0 and ours["attention_mask"][1, -1] == 0  # left vs right padding


# -- a model that cannot be traced ---------------------------------------------------------------------------------


@pytest.fixture
def untraceable_gemma3(monkeypatch):
    """Gemma3 without its tracing patch: transformers' vmap-built masks reach the tracers, which cannot record them."""
    import contextlib

    from peft_export.export import families

    monkeypatch.setattr(families.BidirectionalGemma3, "tracing",
                        lambda self, encoder: contextlib.nullcontext())


@pytest.mark.parametrize("mode,step", [
    ("merged-onnx", "Tracing to ONNX"),
    pytest.param("merged-openvino", "Converting to OpenVINO", marks=pytest.mark.slow)])
def test_untraceable_model_fails_with_one_error(untraceable_gemma3, gemma3_family, tmp_path, mode, step):
    out = tmp_path / "out"
    expected = rf"{step} \(.*\) of the 'gemma3_text' model \(Gemma3TextModel\) failed: .*Nothing was written"
    with pytest.raises(ToolError, match=expected):
        family_models.export_family(mode, gemma3_family.base, gemma3_family.adapter, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_untraceable_switchable_fails_with_one_error(untraceable_gemma3, gemma3_family, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ToolError, match=r"Tracing to ONNX .* 'gemma3_text' model"):
        family_models.export_family("switchable-openvino", gemma3_family.base, gemma3_family.adapter, out)
    assert list(tmp_path.iterdir()) == []


def test_untraceable_model_cli_exit_2(untraceable_gemma3, gemma3_family, tmp_path, capsys):
    from peft_export.cli import main

    out = tmp_path / "out"
    assert main(["merge-onnx", str(gemma3_family.adapter), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("peft-export:")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err  # transformers' progress bars may come first
    assert errors[0].startswith("peft-export: error: Tracing to ONNX") and "'gemma3_text'" in errors[0]
    assert "Traceback" not in err
    assert not out.exists()
