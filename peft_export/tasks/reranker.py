"""The reranker task: a sentence-transformers CrossEncoder (an encoder with its sequence-classification head) that
scores (query, passage) pairs, exported as one graph with ``logits`` and ``scores`` (the logits through the model's
activation) outputs, run by ``CrossEncoderModel``. Its gate figures compare scores and the rankings they give."""

from __future__ import annotations

import numpy as np

from ..runtime.config import RERANKER_CONFIG_FILE
from .base import GateLimit, GateSpec, GraphOutput, Task


def _score_difference(reference: np.ndarray, got: np.ndarray, mask: np.ndarray) -> float:
    """Scores and logits are compared as they are: a reranker's user reads the numbers themselves."""
    return float(np.abs(got - reference).max()) if reference.size else 0.0


SCORE_TOLERANCE = 1e-5

_LONG_PASSAGE = " ".join(["Long passages are truncated with the query to the model's maximum sequence length."] * 700)
# (query, passage) pairs of very different lengths; the last one is longer than any max_seq_length (its passage
# about 10,000 tokens, with a query of a few dozen), so the pair is truncated as transformers truncates it (the
# longest side first).
VALIDATION_PAIRS = (
    ("Hi", "Hello"),
    ("How do I reset my password?", "Open the settings page, choose Security and click 'Reset password'."),
    ("capital of France", "Paris is the capital and most populous city of France."),
    ("What does LoRA change?", "Fine-tuning with LoRA adds a low-rank update B @ A to selected weight matrices."),
    ("zeros", "Return a new array of given shape and type, filled with zeros."),
    ("Émigré café — 東京", "naïve résumé — مرحبا — 👍"),
    ("a context manager that changes the working directory",
     "A context manager that temporarily changes the working directory and restores it on exit."),
    ("Where do similar meanings land?", "Sentence embeddings map text to dense vectors so that similar meanings "
     "land close together, which a cross-encoder then reorders by reading query and passage together."),
    (" ".join(["A long query that takes a good part of a short model's sequence length."] * 4), _LONG_PASSAGE),
)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of ``values`` (ties broken by position; the gate's scores are continuous)."""
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two score vectors (1.0: the same order)."""
    if len(a) < 2:
        return 1.0
    ra, rb = _ranks(a) - (len(a) - 1) / 2, _ranks(b) - (len(b) - 1) / 2
    denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator else 1.0


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """The share of ``a``'s k best-scored items that are also among ``b``'s k best."""
    k = min(k, len(a))
    if k == 0:
        return 1.0
    best_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    best_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(best_a & best_b) / k


def quality_against(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Gate figures of scores ``got`` against ``ref`` of the same pairs (first label where there are several)."""
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)[:, 0]
    got = np.asarray(got, dtype=np.float64).reshape(len(got), -1)[:, 0]
    return {
        "max_score_diff": float(np.abs(got - ref).max()) if len(ref) else 0.0,
        "mean_score_diff": float(np.abs(got - ref).mean()) if len(ref) else 0.0,
        "spearman": spearman(ref, got),
        "top10_overlap": top_k_overlap(ref, got, 10),
        "pairs": len(ref),
    }


GATE_QUERIES = 100  # gate queries, each scored with its own passage and IRRELEVANT_PER_QUERY others
IRRELEVANT_PER_QUERY = 3
SCREEN_QUERIES = 24  # queries (with their passages) a lossy candidate is screened on before the full gate


def gate_pairs(pairs: list[dict[str, str]]) -> list[tuple[str, str]]:
    """The (query, passage) pairs the gate scores: each of the first GATE_QUERIES queries with its own (relevant)
    passage, then the passages of IRRELEVANT_PER_QUERY other queries spread over the set, query after query."""
    n = min(len(pairs), GATE_QUERIES)
    offsets = [1 + k * max(1, n // (IRRELEVANT_PER_QUERY + 1)) for k in range(IRRELEVANT_PER_QUERY)]
    out = []
    for i in range(n):
        query = pairs[i]["query"]
        out.append((query, pairs[i]["passage"]))
        out += [(query, pairs[(i + offset) % n]["passage"]) for offset in offsets if (i + offset) % n != i]
    return out


def calibration_pairs(texts: list[str]) -> list[tuple[str, str]]:
    """Calibration texts (queries, then their passages) as the (query, passage) pairs a reranker reads."""
    half = len(texts) // 2
    return list(zip(texts[:half], texts[half:2 * half])) or [(t, t) for t in texts]


def screen_rows(n_pairs: int) -> np.ndarray:
    """The gate pairs of the first SCREEN_QUERIES queries."""
    per_query = 1 + IRRELEVANT_PER_QUERY if n_pairs > 1 else 1
    return np.arange(min(SCREEN_QUERIES, GATE_QUERIES, n_pairs) * per_query)


def describe_quality(q: dict[str, float]) -> str:
    return (f"max score diff {q['max_score_diff']:.5f}, mean {q['mean_score_diff']:.5f}, Spearman "
            f"{q['spearman']:.5f}, top-10 overlap {q['top10_overlap']:.2f} on {q['pairs']} pairs")


RERANKER_GATE = GateSpec(
    output="scores",  # what users read: the logits through the model's activation
    inputs=gate_pairs,
    calibration_inputs=calibration_pairs,
    screen_rows=screen_rows,
    limits=(GateLimit("max_score_diff", "max_score_diff", at_least=False, screen_margin=0.0),
            GateLimit("mean_score_diff", "max_mean_score_diff", at_least=False, screen_margin=0.002),
            GateLimit("spearman", "min_spearman", at_least=True),
            GateLimit("top10_overlap", "min_top10_overlap", at_least=True)),
    summary=("max_score_diff", "mean_score_diff", "spearman", "top10_overlap", "pairs"),
    describe=describe_quality,
)

# A batch group's option (serve/reranker_routes.py) -> CrossEncoderModel.predict's options: None or False for the
# model's own scores, True for the raw logits (TEI's raw_scores), and TEI's /predict post-processing of the logits:
# a softmax over several labels, the sigmoid of one.
_BATCH_OPTIONS = {
    None: {}, False: {}, True: {"activation_fn": "identity"},
    "softmax": {"activation_fn": "identity", "apply_softmax": True},
    "sigmoid": {"activation_fn": "sigmoid"},
}


def batch_options(option) -> dict:
    """``predict``'s options for a batch group's option: a key of the table above, or ``(key, prompt)`` for a
    request with a prompt other than the model's default (serve/reranker_routes.py)."""
    if isinstance(option, tuple):
        key, prompt = option
        return {**_BATCH_OPTIONS[key], "prompt": prompt}
    return dict(_BATCH_OPTIONS[option])


RERANKER = Task(
    name="reranker",
    sentence_transformers_class="CrossEncoder",
    transformers_auto_class="AutoModelForSequenceClassification",
    outputs=(GraphOutput("logits", SCORE_TOLERANCE, _score_difference, label="logits"),
             GraphOutput("scores", SCORE_TOLERANCE, _score_difference, label="scores")),
    text_pairs=True,
    validation_texts=VALIDATION_PAIRS,
    runtime_config_file=RERANKER_CONFIG_FILE,
    torch_module="peft_export.export.reranker_module:build_reranker_module",
    runtime_class="peft_export.runtime.reranker_model:CrossEncoderModel",
    routes="peft_export.serve.reranker_routes:reranker_routes",
    quality=quality_against,
    gate=RERANKER_GATE,
    batch_call="predict",
    batch_options=batch_options,
    served_attributes=("predict", "max_seq_length", "pair_token_overhead"),
    try_it='peft-export rerank {path} "a query" "a passage that answers it" "another passage"',
)
