"""The embedding task: a SentenceTransformer (encoder -> pooling -> Dense* -> Normalize) exported as one graph
with ``sentence_embedding`` and ``token_embeddings`` outputs, run by ``EmbeddingModel`` and served on the OpenAI
and TEI embedding routes. Its gate compares embeddings by cosine and by retrieval (NDCG@10) retention."""

from __future__ import annotations

import numpy as np

from ..runtime.config import RUNTIME_CONFIG_FILE
from ..runtime.similarity import normalize
from .base import GateLimit, GateSpec, GraphOutput, Task


def _normalised_difference(reference: np.ndarray, got: np.ndarray, mask: np.ndarray) -> float:
    """Sentence embeddings are compared after L2 normalisation (what similarity search sees)."""
    return float(np.abs(normalize(got) - normalize(reference)).max())


def _token_difference(reference: np.ndarray, got: np.ndarray, mask: np.ndarray) -> float:
    """Token embeddings are compared on real tokens only: padded positions hold whatever the encoder left there."""
    keep = mask.astype(bool)
    return float(np.abs(got[keep] - reference[keep]).max())


SENTENCE_TOLERANCE = 1e-5  # on L2-normalised sentence embeddings
TOKEN_TOLERANCE = 1e-4

# Real sentences of very different lengths; the last one is made longer than any max_seq_length.
VALIDATION_TEXTS = (
    "Hi",
    "How do I reset my password?",
    "The quick brown fox jumps over the lazy dog.",
    "Return a new array of given shape and type, filled with zeros.",
    "A context manager that temporarily changes the working directory and restores it on exit.",
    "Sentence embeddings map text to dense vectors so that similar meanings land close together.",
    "Fine-tuning with LoRA adds a low-rank update B @ A to selected weight matrices of the network.",
    "Émigré café naïve résumé — 東京 — مرحبا — 👍",
    # About 10,000 tokens: longer than any max_seq_length up to 8192.
    " ".join(["Long inputs are truncated to the model's maximum sequence length before encoding."] * 700),
)


def ndcg_at_10(queries: np.ndarray, passages: np.ndarray) -> float:
    """One relevant passage per query (same row index); cosine ranking."""
    scores = normalize(queries) @ normalize(passages).T  # (n_queries, n_passages)
    rank = (scores > scores.diagonal()[:, None]).sum(axis=1)  # 0 = first
    return float(np.where(rank < 10, 1.0 / np.log2(rank + 2), 0.0).mean())


def quality_against(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Gate figures of embeddings ``got`` against ``ref``, both of the gate's texts (queries, then passages)."""
    cosine = (normalize(ref) * normalize(got)).sum(axis=1)
    n = len(ref) // 2
    ndcg_ref, ndcg_got = ndcg_at_10(ref[:n], ref[n:]), ndcg_at_10(got[:n], got[n:])
    return {
        "mean_cosine": float(cosine.mean()),
        "worst_cosine": float(cosine.min()),
        "ndcg10_reference": ndcg_ref,
        "ndcg10": ndcg_got,
        "ndcg10_retention": ndcg_got / ndcg_ref if ndcg_ref > 0 else 0.0,
        "texts": len(ref),
    }


def gate_texts(pairs: list[dict[str, str]]) -> list[str]:
    """The texts the gate embeds: the pairs' queries, then their passages (the order quality_against expects)."""
    return [p["query"] for p in pairs] + [p["passage"] for p in pairs]


SCREEN_PAIRS = 24  # pairs (48 texts) a lossy candidate is screened on before the full gate


def screen_rows(n_pairs: int) -> np.ndarray:
    """Rows of the gate's texts (queries, then passages) the screen embeds: the first pairs, both sides."""
    k = min(SCREEN_PAIRS, n_pairs)
    return np.concatenate([np.arange(k), n_pairs + np.arange(k)])


def describe_quality(q: dict[str, float]) -> str:
    return (f"mean cosine {q['mean_cosine']:.5f}, worst {q['worst_cosine']:.5f}, NDCG@10 retention "
            f"{q['ndcg10_retention']:.4f} on {q['texts']} texts")


EMBEDDING_GATE = GateSpec(
    output="sentence_embedding",
    inputs=gate_texts,
    calibration_inputs=list,
    screen_rows=screen_rows,
    limits=(GateLimit("mean_cosine", "min_mean_cosine", at_least=True, screen_margin=0.002),
            GateLimit("worst_cosine", "min_worst_cosine", at_least=True, screen_margin=0.0),
            GateLimit("ndcg10_retention", "min_ndcg_retention", at_least=True)),
    summary=("mean_cosine", "worst_cosine", "ndcg10_reference", "ndcg10", "ndcg10_retention", "texts"),
    describe=describe_quality,
)

EMBEDDING = Task(
    name="embedding",
    sentence_transformers_class="SentenceTransformer",
    transformers_auto_class="AutoModel",
    outputs=(GraphOutput("sentence_embedding", SENTENCE_TOLERANCE, _normalised_difference, label="sentence",
                         description="normalised embeddings", no_adapter_tolerance=1e-6),
             GraphOutput("token_embeddings", TOKEN_TOLERANCE, _token_difference, label="tokens", per_token=True)),
    text_pairs=False,
    validation_texts=VALIDATION_TEXTS,
    runtime_config_file=RUNTIME_CONFIG_FILE,
    torch_module="peft_export.export.embedding_module:build_embedding_module",
    runtime_class="peft_export.runtime.model:EmbeddingModel",
    routes="peft_export.serve.embedding_routes:embedding_routes",
    quality=quality_against,
    gate=EMBEDDING_GATE,
    required_modules=("pooling",),
    batch_call="encode",
    batch_options=lambda prompt_name: {} if prompt_name is None else {"prompt_name": prompt_name},
    served_attributes=("encode", "get_sentence_embedding_dimension", "max_seq_length"),
)
