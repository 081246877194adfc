"""The builders of models at published dimensions with random weights (benchmarks/build_encoder_model.py,
benchmarks/build_decoder_model.py), run at tiny dimensions: the folders load in sentence-transformers with the
layout and dimensions asked for, and the adapter targets the family's modules and changes the embeddings."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest

from peft_export.export.families import family_for

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = dict(layers=3, hidden=64, heads=2, ffn=96, vocab=1200, max_len=128, tok_vocab=1000)
TEXTS = ["How do I reset my password?", "The cat sat on the mat while it rained outside all afternoon."]


def _script(name: str) -> dict:
    return runpy.run_path(str(BENCHMARKS / f"{name}.py"), run_name=name)


@pytest.fixture(scope="module")
def encoder_builder() -> dict:
    return _script("build_encoder_model")


@pytest.fixture(scope="module", params=["xlm-roberta", "modernbert"])
def tiny_encoder(request, encoder_builder, tmp_path_factory):
    family = request.param
    st, adapter = encoder_builder["build"](family, tmp_path_factory.mktemp(family), **TINY)
    return family, st, adapter


@pytest.mark.slow
def test_the_encoder_folder_loads_with_the_layout_and_dimensions_asked_for(tiny_encoder, encoder_builder):
    from sentence_transformers import SentenceTransformer

    family, st, _ = tiny_encoder
    model = SentenceTransformer(str(st), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    assert model[1].get_config_dict()["pooling_mode"] == "mean"
    assert model.max_seq_length == TINY["max_len"]
    assert model.prompts.items() >= encoder_builder["PUBLISHED"][family].prompts.items()
    config = model[0].auto_model.config
    assert config.model_type == family
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.vocab_size) == (64, 3, 2, 96, 1200)
    if family == "modernbert":
        assert (config.global_attn_every_n_layers, config.local_attention) == (3, 128)
        assert config.max_position_embeddings == TINY["max_len"]
        assert "token_type_ids" not in model.tokenizer("a text")
    else:
        assert config.max_position_embeddings == TINY["max_len"] + 2  # positions start after the padding index
        assert model.tokenizer.pad_token_id == 1
    assert model.encode(TEXTS).shape == (2, 64)


@pytest.mark.slow
def test_the_encoder_adapter_is_r16_on_the_family_targets_and_changes_the_embeddings(tiny_encoder):
    from sentence_transformers import SentenceTransformer

    family, st, adapter = tiny_encoder
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert sorted(config["target_modules"]) == sorted(family_for(family).lora_targets)
    model = SentenceTransformer(str(st), device="cpu")
    base = model.encode(TEXTS)
    model.load_adapter(str(adapter))
    adapted = model.encode(TEXTS)
    assert np.abs(adapted - base).max() > 1e-4  # far beyond float noise: B is non-zero
    assert (base * adapted).sum(1).min() > 0.5  # moved a little, as a trained adapter does, not scrambled


def test_the_default_encoder_configs_are_the_published_dimensions(encoder_builder):
    """Checked against the hub's config.json of FacebookAI/xlm-roberta-base and answerdotai/ModernBERT-base."""
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(pad_token_id=50283, cls_token_id=50281, sep_token_id=50282)
    configs = {}
    for family, published in encoder_builder["PUBLISHED"].items():
        configs[family] = encoder_builder["model_config"](
            family, tokenizer, layers=published.layers, hidden=published.hidden, heads=published.heads,
            ffn=published.ffn, vocab=published.vocab, max_len=published.max_seq_length)
    xlmr, modernbert = configs["xlm-roberta"], configs["modernbert"]
    assert (xlmr.hidden_size, xlmr.num_hidden_layers, xlmr.num_attention_heads, xlmr.intermediate_size,
            xlmr.vocab_size, xlmr.max_position_embeddings, xlmr.pad_token_id) == (768, 12, 12, 3072, 250_002, 514, 1)
    assert (modernbert.hidden_size, modernbert.num_hidden_layers, modernbert.num_attention_heads,
            modernbert.intermediate_size, modernbert.vocab_size, modernbert.max_position_embeddings,
            modernbert.global_attn_every_n_layers, modernbert.local_attention) == (
        768, 22, 12, 1152, 50_368, 8192, 3, 128)


@pytest.mark.slow
def test_the_decoder_builder_still_builds_qwen3_embeddings_layout(tmp_path):
    """build_decoder_model.py now shares the tokenizer and adapter code (peft_export/bench/random_models.py)."""
    from sentence_transformers import SentenceTransformer

    build = _script("build_decoder_model")["build"]
    st, adapter = build(tmp_path / "q", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=96, vocab=1200,
                        max_len=128, tok_vocab=1000)
    model = SentenceTransformer(str(st), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    assert model[1].get_config_dict()["pooling_mode"] == "lasttoken"
    assert model.tokenizer.padding_side == "left"
    ids = model.tokenizer("a query")["input_ids"]
    assert ids[-1] == model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = model[0].auto_model.config
    assert (config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == (2, 2, 16)
    base = model.encode(TEXTS)
    model.load_adapter(str(adapter))
    assert not np.allclose(base, model.encode(TEXTS), atol=1e-4)
    assert sorted(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) == sorted(
        family_for("qwen3").lora_targets)
