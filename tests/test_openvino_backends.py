"""The same runtime tests against an ONNX Runtime export and an OpenVINO export of one merged model.

Ground truth is sentence-transformers with the unmerged PEFT adapter. OpenVINO runs with its default settings
here, which in peft_export means the f32 precision hint, so the tolerance is the export's: 1e-5.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from openvino_fixtures import *  # noqa: F401,F403
from openvino_fixtures import HAVE_OPENVINO

from peft_export import EmbeddingModel

TOLERANCE = 1e-5
SENTENCES = [
    "How do I reset my password?",
    "Return a new array of given shape and type, filled with zeros.",
    "Hi",
    "Sentence embeddings map text to dense vectors so that similar meanings land close together.",
    "A context manager that temporarily changes the working directory and restores it on exit.",
    "Émigré café naïve résumé",
    "The quick brown fox jumps over the lazy dog.",
]
ODD_INPUTS = ["", "   ", "a\x00b", "👍🏽🎉", "مرحبا بالعالم", "é", "\u0301\u0301x"]
LONG = " ".join(["Long inputs are truncated to the model's maximum sequence length before encoding."] * 30)

BACKENDS = [
    pytest.param("onnxruntime", id="onnxruntime"),
    pytest.param("openvino", id="openvino",
                 marks=pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino is not installed "
                                                                    "(pip install 'peft_export[openvino]')")),
]


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, tiny_exports) -> EmbeddingModel:
    kind = "onnx" if request.param == "onnxruntime" else "openvino-fp32"
    loaded = EmbeddingModel(tiny_exports[kind])  # backend chosen from the folder
    assert loaded.backend.name == request.param
    return loaded


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_parity_with_sentence_transformers_at_batch_1(model, tiny_reference):
    for text in SENTENCES + [LONG]:
        got = model.encode(text)
        want = tiny_reference.encode(text)
        assert got.shape == want.shape == (32,)
        assert np.abs(_unit(got) - _unit(want)).max() < TOLERANCE, text


def test_parity_with_sentence_transformers_on_mixed_batches(model, tiny_reference):
    texts = SENTENCES + [LONG] + ODD_INPUTS
    for batch_size in (2, 3, 32):
        got = model.encode(texts, batch_size=batch_size)
        want = tiny_reference.encode(texts, batch_size=batch_size)
        assert got.shape == (len(texts), 32)
        assert np.abs(_unit(got) - _unit(want)).max() < TOLERANCE


def test_empty_list_and_single_string_shapes(model):
    assert model.encode([]).shape == (0, 32)
    assert model.encode("one string").shape == (32,)


def test_odd_inputs_are_deterministic_and_finite(model):
    first = model.encode(ODD_INPUTS)
    again = model.encode(ODD_INPUTS)
    assert np.isfinite(first).all()
    assert np.array_equal(first, again)
    for i, text in enumerate(ODD_INPUTS):
        assert np.abs(model.encode(text) - first[i]).max() < TOLERANCE


def test_long_input_is_truncated_like_sentence_transformers(model, tiny_reference):
    longer = LONG + " and more words that fall past the limit"
    assert len(model.tokenize([longer])["input_ids"][0]) == model.max_seq_length
    assert np.abs(model.encode(longer) - model.encode(LONG)).max() < TOLERANCE
    assert np.abs(model.encode(longer) - tiny_reference.encode(longer)).max() < TOLERANCE


def test_same_input_alone_in_a_batch_and_after_many_calls(model):
    alone = model.encode("Hi")
    in_batch = model.encode([LONG, "Hi", SENTENCES[3]])[1]
    assert np.abs(alone - in_batch).max() < TOLERANCE
    for _ in range(200):
        model.encode(["Hi", SENTENCES[0]])
    assert np.abs(model.encode("Hi") - alone).max() < TOLERANCE


def test_token_embeddings_have_one_row_per_token(model, tiny_reference):
    got = model.encode(["Hi", SENTENCES[3]], output_value="token_embeddings")
    want = tiny_reference.encode(["Hi", SENTENCES[3]], output_value="token_embeddings")
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        assert np.abs(g - w.numpy()).max() < 1e-4


def test_similarity_matches_sentence_transformers(model, tiny_reference):
    emb = model.encode(SENTENCES)
    want = tiny_reference.similarity(tiny_reference.encode(SENTENCES), tiny_reference.encode(SENTENCES)).numpy()
    assert np.abs(model.similarity(emb, emb) - want).max() < 1e-5
    with pytest.raises(ValueError, match="NaN"):
        model.similarity(emb, np.full_like(emb, np.nan))


def test_concurrent_encode_calls_see_only_their_inputs(model):
    groups = [SENTENCES[i:] + [LONG] * i for i in range(6)]
    expected = [model.encode(texts, batch_size=3) for texts in groups]
    failures: list[str] = []

    def worker(i: int) -> None:
        for _ in range(15):
            got = model.encode(groups[i], batch_size=3)
            if got.shape != expected[i].shape or np.abs(got - expected[i]).max() > TOLERANCE:
                failures.append(f"thread {i}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(groups))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_graph_runs_at_untraced_batch_and_sequence_sizes(model, tiny_merged):
    """Dynamic axes: batch 1, 2, 7 and lengths 1, 16, max_seq_length against the merged PyTorch pipeline."""
    import torch

    rng = np.random.default_rng(0)
    for batch in (1, 2, 7):
        for length in (1, 16, model.max_seq_length):
            feeds = {name: np.zeros((batch, length), np.int64) for name in model.backend.input_names}
            feeds["input_ids"] = rng.integers(1000, 20000, (batch, length), dtype=np.int64)
            feeds["attention_mask"] = np.ones((batch, length), np.int64)
            feeds["attention_mask"][1:, max(1, length // 2):] = 0  # padded rows
            got = model.backend.run(feeds)
            with torch.no_grad():
                sentence, _ = tiny_merged.pipeline(**{k: torch.from_numpy(v) for k, v in feeds.items()})
            assert got["sentence_embedding"].shape == (batch, 32)
            assert np.abs(got["sentence_embedding"] - sentence.numpy()).max() < TOLERANCE, (batch, length)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_minilm_with_adapter_parity(backend, minilm_adapter, tmp_path):
    """all-MiniLM-L6-v2 + a LoRA adapter, exported with each backend's format, against sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    from peft_export.export.api import export_onnx_model, export_openvino_model

    export = export_onnx_model if backend == "onnxruntime" else export_openvino_model
    out = export(str(minilm_adapter["adapter"]), tmp_path / "out", base=str(minilm_adapter["base"]))
    reference = SentenceTransformer(str(minilm_adapter["base"]), device="cpu")
    base_embeddings = reference.encode(SENTENCES)
    reference.load_adapter(str(minilm_adapter["adapter"]))
    model = EmbeddingModel(out.path)
    assert model.backend.name == backend
    texts = SENTENCES + [LONG] + ODD_INPUTS
    for text in SENTENCES[:3] + [LONG]:
        assert np.abs(model.encode(text) - reference.encode(text)).max() < TOLERANCE
    got = model.encode(texts, batch_size=4)
    assert np.abs(got - reference.encode(texts, batch_size=4)).max() < TOLERANCE
    assert np.abs(got[: len(SENTENCES)] - base_embeddings).max() > 1e-2  # the adapter matters
