"""The quality gate of lossy exports (int8, fp16, bf16): agreement with fp32 and retrieval retention on real text.

Retrieval retention is NDCG@10 of the lossy model divided by the fp32 model's, on a query -> passage set where
each query has exactly one relevant passage (by default the demo corpus' held-out pairs, export/gate_data.py). The
figures themselves are the task's (tasks/embedding.py: cosine and NDCG@10 retention).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from ..errors import ValidationError
from ..tasks import Task

Embed = Callable[[list[str]], np.ndarray]


@dataclass
class QualityGate:
    min_mean_cosine: float = 0.99
    min_worst_cosine: float = 0.97
    min_ndcg_retention: float = 0.995

    def failures(self, quality: dict[str, float]) -> list[str]:
        checks = [("mean_cosine", self.min_mean_cosine), ("worst_cosine", self.min_worst_cosine),
                  ("ndcg10_retention", self.min_ndcg_retention)]
        return [f"{key} {quality[key]:.5f} < {limit}" for key, limit in checks if not quality[key] >= limit]


# How to lower the gate: the keyword of export_onnx_model / export_openvino_model, and peft-export's flags.
LOWER_GATE = "gate=QualityGate(min_mean_cosine=..., min_worst_cosine=..., min_ndcg_retention=...)"
LOWER_GATE_CLI = "--min-mean-cosine / --min-worst-cosine / --min-ndcg-retention"

# fp16 weights lose almost nothing; their gate is never looser than this, whatever --min-mean-cosine says.
FP16_MIN_MEAN_COSINE = 0.999


def fp16_gate(gate: QualityGate) -> QualityGate:
    """The gate for fp16 candidates: the user's, with the mean cosine raised to at least 0.999."""
    return replace(gate, min_mean_cosine=max(gate.min_mean_cosine, FP16_MIN_MEAN_COSINE))


def gate_texts(pairs: list[dict[str, str]]) -> list[str]:
    """The texts a gate embeds: the pairs' queries, then their passages (the order the task's figures expect)."""
    return [p["query"] for p in pairs] + [p["passage"] for p in pairs]


def measure_quality(reference: Embed, candidate: Embed, pairs: list[dict[str, str]], task: Task) -> dict[str, float]:
    """The task's gate figures of ``candidate`` against ``reference`` on the gate pairs."""
    texts = gate_texts(pairs)
    return task.quality(reference(texts), candidate(texts))


SCREEN_PAIRS = 24  # pairs (48 texts) a rung is screened on before the full gate
SCREEN_MEAN_MARGIN = 0.002  # the screen rejects on the mean only when it is this far under the gate


def screen_rows(n_pairs: int) -> np.ndarray:
    """Rows of the gate's texts (queries, then passages) the screen embeds: the first pairs, both sides."""
    k = min(SCREEN_PAIRS, n_pairs)
    return np.concatenate([np.arange(k), n_pairs + np.arange(k)])


def screen_failures(cosines: np.ndarray, gate: QualityGate) -> list[str]:
    """Why a screen's cosines already rule a candidate out: a worst cosine under the gate's is under it on the full
    set too; a mean is only an estimate, so it rejects with a margin."""
    failures = []
    if cosines.min() < gate.min_worst_cosine:
        failures.append(f"screen worst_cosine {cosines.min():.5f} < {gate.min_worst_cosine}")
    if cosines.mean() < gate.min_mean_cosine - SCREEN_MEAN_MARGIN:
        failures.append(f"screen mean_cosine {cosines.mean():.5f} < {gate.min_mean_cosine} - {SCREEN_MEAN_MARGIN}")
    return failures


def enforce(gate: QualityGate, quality: dict[str, float], what: str) -> None:
    failures = gate.failures(quality)
    if failures:
        def say(lower: str) -> str:
            return (f"{what} fails the quality gate ({'; '.join(failures)}). Nothing was written. Lower the gate "
                    f"explicitly ({lower}) if this loss is acceptable.")

        raise ValidationError(say(LOWER_GATE)).in_cli_words(say(LOWER_GATE_CLI))


def gate_dict(gate: QualityGate) -> dict[str, float]:
    return asdict(gate)


def backend_embedder(tokenizer, backend, batch_size: int = 32) -> Embed:
    """``texts -> (n, dim)`` sentence embeddings from a runtime backend, batched exactly as
    ``EmbeddingModel.encode`` batches on a CPU (by token length, longest first, under its default token budget),
    so figures measured here are the ones users reproduce: dynamic int8 picks activation scales per batch, so
    batch composition matters."""
    from ..runtime.model import CPU_MAX_BATCH_TOKENS

    def embed(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 0), np.float32)
        for index, feeds in tokenizer.batches(texts, batch_size, CPU_MAX_BATCH_TOKENS):
            emb = backend.run(feeds, ["sentence_embedding"])["sentence_embedding"]
            if out.shape[1] == 0:
                out = np.zeros((len(texts), emb.shape[1]), np.float32)
            out[index] = emb
        return out

    return embed


# Standard-library modules whose docstrings are prose; none has side effects at import.
