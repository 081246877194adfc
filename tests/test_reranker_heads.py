"""Rerankers (issue 25): SEQ_CLS adapters whose trained classification head is saved in ``modules_to_save`` (the
usual trained reranker adapter), from a sentence-transformers CrossEncoder and from plain transformers
``AutoModelForSequenceClassification`` + PEFT. The saved head replaces the base head in the merged ONNX and OpenVINO
exports (1e-5 against eager PEFT); hostile head tensors are refused naming the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import peft_export
from fixtures import tiny_models
from peft_export import ConfigError, export_onnx_model, export_openvino_model
from peft_export.tasks.reranker import VALIDATION_PAIRS

TOLERANCE = 1e-5
PAIRS = [tuple(p) for p in VALIDATION_PAIRS] + [("How do I reset my password?", "Open Security, then Reset."),
                                                ("capital of France", "The weather is nice today.")]
HEAD_KEYS = ("base_model.model.classifier.weight", "base_model.model.classifier.bias")


def _quiet(_msg: str) -> None:
    pass


def _perturb_head_copies(model, seed: int) -> None:
    """Make the trained copy of the head (PEFT's modules_to_save wrapper) differ clearly from the base head."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.normal_(0.0, 2.0)


def _cross_encoder_head_adapter(base: Path, folder: Path) -> Path:
    """``CrossEncoder(base).add_adapter(LoraConfig(task_type="SEQ_CLS", modules_to_save=["classifier"]))``, head
    copy trained (perturbed), saved with ``CrossEncoder.save_pretrained``."""
    import torch
    from peft import LoraConfig
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(base), device="cpu")
    torch.manual_seed(3)
    model.add_adapter(LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                                 modules_to_save=["classifier"], init_lora_weights=False))
    _perturb_head_copies(model.model, 4)
    model.save_pretrained(str(folder))
    return folder


def _plain_base(reranker_base: Path, folder: Path) -> Path:
    """The tiny CrossEncoder as a plain transformers folder (no Sentence Transformers files)."""
    shutil.copytree(reranker_base, folder)
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"):
        (folder / name).unlink()
    return folder


def _plain_peft_adapter(base: Path, folder: Path) -> Path:
    """``get_peft_model(AutoModelForSequenceClassification(base), LoraConfig(task_type="SEQ_CLS"))``: PEFT adds the
    classifier to modules_to_save itself; saved with PeftModel.save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_pretrained(str(base))
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                  target_modules=["query", "value"], init_lora_weights=False))
    _perturb_head_copies(peft_model, 6)
    peft_model.save_pretrained(str(folder))
    return folder


def _eager_logits(base: Path, adapter: Path | None) -> np.ndarray:
    """Eager PEFT: the base sequence classifier with the adapter attached by PeftModel.from_pretrained (its task
    wrapper puts the saved head in place), unmerged, on the pairs tokenized as the base's tokenizer does."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(base)).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    with torch.no_grad():
        out = []
        for query, passage in PAIRS:  # batch 1: no padding in the reference
            feeds = tokenizer([query], [passage], truncation=True, max_length=64, return_tensors="pt")
            out.append(model(**feeds).logits[0, 0].item())
    return np.array(out)


@pytest.fixture(scope="module")
def heads(reranker, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    ce_adapter = _cross_encoder_head_adapter(reranker["base"], root / "ce-head")
    plain = _plain_base(reranker["base"], root / "plain")
    plain_adapter = _plain_peft_adapter(plain, root / "plain-head")
    return {"ce_adapter": ce_adapter, "plain": plain, "plain_adapter": plain_adapter}


def test_adapters_save_the_head_as_peft_names_it(heads):
    from safetensors import safe_open

    for key in ("ce_adapter", "plain_adapter"):
        config = json.loads((heads[key] / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
        with safe_open(str(heads[key] / "adapter_model.safetensors"), "np") as fh:
            assert set(HEAD_KEYS) <= set(fh.keys())  # peft 0.21: the copy's own name, no "modules_to_save.default"


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("which", ["ce_adapter", "plain_adapter"])
def test_saved_head_replaces_the_base_head(reranker, heads, which, fmt, tmp_path):
    base = reranker["base"] if which == "ce_adapter" else heads["plain"]
    export = export_onnx_model if fmt == "onnx" else export_openvino_model
    out = export(str(heads[which]), tmp_path / fmt, log=_quiet).path
    got = peft_export.load(out).predict(PAIRS, batch_size=4, activation_fn="identity")
    want = _eager_logits(base, heads[which])
    assert np.abs(got - want).max() <= TOLERANCE
    # The head made the difference: LoRA alone (the base head) would score otherwise.
    assert np.abs(got - _eager_logits(base, None)).max() > 0.1
    manifest = json.loads((out / "peft_export.json").read_text())
    assert manifest["task"] == "reranker"


def test_cross_encoder_load_adapter_agrees_with_the_export(reranker, heads, tmp_path):
    """sentence-transformers' own eager path (CrossEncoder.load_adapter) scores what the export scores."""
    out = export_onnx_model(str(heads["ce_adapter"]), tmp_path / "onnx", log=_quiet).path
    reference = tiny_models.cross_encoder_reference(reranker["base"], heads["ce_adapter"])
    assert np.abs(peft_export.load(out).predict(PAIRS) - reference.predict(PAIRS)).max() <= TOLERANCE


def _hostile(adapter: Path, folder: Path, key: str, change) -> Path:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(adapter, folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors[key] = change(tensors[key])
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("attack, change, message", [
    ("nan", lambda t: np.full_like(t, np.nan),
     r"tensor 'base_model\.model\.classifier\.weight' contains NaN or Inf values"),
    ("shape", lambda t: np.zeros((t.shape[0], t.shape[1] + 1), t.dtype),
     r"tensor 'base_model\.model\.classifier\.weight' \(modules_to_save\) has shape \(1, 33\) but the base parameter "
     r"'classifier\.weight' has shape \(1, 32\)"),
])
def test_hostile_head_tensors_are_refused_naming_the_key(heads, attack, change, message, tmp_path):
    bad = _hostile(heads["ce_adapter"], tmp_path / attack, "base_model.model.classifier.weight", change)
    with pytest.raises(ConfigError, match=message):
        export_onnx_model(str(bad), tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists()


def test_a_head_missing_from_the_file_is_refused(heads, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "no-bias"
    shutil.copytree(heads["ce_adapter"], bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    del tensors["base_model.model.classifier.bias"]
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=r"tensor base_model\.model\.classifier\.bias is missing: modules_to_save "
                                          r"\['classifier'\] stores a trained copy of 'classifier'"):
        export_onnx_model(str(bad), tmp_path / "out", log=_quiet)


def test_switchable_export_gives_each_adapter_its_own_head(reranker, heads, tmp_path):
    """Two SEQ_CLS adapters, each with its trained head in modules_to_save, in one switchable export: each call
    scores with that adapter's LoRA and head (1e-5 against eager PEFT), no adapter with the base head."""
    second = _cross_encoder_head_adapter(reranker["base"], tmp_path / "ce-head-2")
    config = json.loads((second / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(second / "adapter_model.safetensors"))  # same seeds as the first: make it differ
    torch.manual_seed(11)
    tensors = {k: v + 0.5 * torch.randn_like(v) for k, v in tensors.items()}
    save_file(tensors, str(second / "adapter_model.safetensors"))
    out = export_onnx_model(str(reranker["base"]), tmp_path / "switchable", switchable=True, log=_quiet,
                            adapters=[f"one={heads['ce_adapter']}", f"two={second}"]).path
    model = peft_export.load(out)
    scores = {}
    for name, adapter in (("one", heads["ce_adapter"]), ("two", second), (None, None)):
        got = model.predict(PAIRS, batch_size=4, activation_fn="identity", adapter=name)
        assert np.abs(got - _eager_logits(reranker["base"], adapter)).max() <= TOLERANCE, name
        scores[name] = got
    assert np.abs(scores["one"] - scores["two"]).max() > 0.1
    config = json.loads((out / "reranker_config.json").read_text())
    assert {p["name"] for p in config["saved_params"]} == {"classifier.weight", "classifier.bias"}


def _changed_head_adapter(adapter: Path, folder: Path, seed: int) -> Path:
    """A copy of ``adapter`` whose every tensor (LoRA and head) differs from the original's."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(adapter, folder)
    rng = np.random.default_rng(seed)
    tensors = {key: (value + 0.5 * rng.standard_normal(value.shape)).astype(np.float32)
               for key, value in load_file(str(adapter / "adapter_model.safetensors")).items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_add_adapter_takes_an_adapter_with_its_trained_head(reranker, heads, tmp_path):
    """add-adapter of the usual trained reranker adapter (SEQ_CLS, head in modules_to_save) onto a switchable export
    whose graph has head inputs scores with that adapter's head (1e-5 against eager PEFT). It used to be refused:
    the head's tensors were read as LoRA tensors ("'base_model.model.classifier.bias' is not a LoRA weight")."""
    from peft_export.export.switchable_changes import add_adapter

    out = export_onnx_model(str(reranker["base"]), tmp_path / "switchable", switchable=True, log=_quiet,
                            adapters=[f"one={heads['ce_adapter']}"]).path
    second = _changed_head_adapter(heads["ce_adapter"], tmp_path / "ce-head-2", seed=12)
    add_adapter(out, f"two={second}", log=_quiet)
    model = peft_export.load(out)
    assert model.list_adapters() == ["one", "two"]
    got = model.predict(PAIRS, batch_size=4, activation_fn="identity", adapter="two")
    assert np.abs(got - _eager_logits(reranker["base"], second)).max() <= TOLERANCE
    assert np.abs(got - model.predict(PAIRS, batch_size=4, activation_fn="identity", adapter="one")).max() > 0.1


def test_add_adapter_refuses_a_head_the_graph_has_no_input_for(reranker, heads, tmp_path):
    """A switchable export made from LoRA-only adapters has no input for a head: an adapter that trained one is
    refused, naming the head, and the export is left as it was (never scored with the base head instead)."""
    from peft_export.export.switchable_changes import add_adapter

    out = export_onnx_model(str(reranker["base"]), tmp_path / "switchable", switchable=True, log=_quiet,
                            adapters=[f"lora={reranker['adapter']}"]).path
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"The adapter trains its own copy of 'classifier\.(weight|bias)' "
                                          r"\(modules_to_save\), and this switchable graph has no input for it"):
        add_adapter(out, f"head={heads['ce_adapter']}", log=_quiet)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
