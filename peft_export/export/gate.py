"""The quality gate of lossy exports (int8, fp16, bf16): agreement with fp32 on real text, judged by the figures
of the task being exported (tasks/: ``Task.quality`` and ``Task.gate``).

The gate runs the fp32 graph and each lossy candidate on the task's inputs made of a query/passage set where each
query has exactly one relevant passage (by default the demo corpus' held-out pairs, export/gate_data.py): for an
embedder the texts (figures: cosine to fp32 and NDCG@10 retention), for a reranker the pairs of each query with its
relevant passage and irrelevant ones (figures: score differences, Spearman and top-10 overlap with fp32).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from ..errors import ValidationError
from ..tasks import EMBEDDING, Task

Embed = Callable[[list[str]], np.ndarray]


@dataclass
class QualityGate:
    """The limits of the quality gate. Each applies to the figure of the task being exported that its name says
    (Task.gate.limits): the cosine and NDCG limits to embedders, the score and ranking limits to rerankers."""

    min_mean_cosine: float = 0.99
    min_worst_cosine: float = 0.97
    min_ndcg_retention: float = 0.995
    max_score_diff: float = 0.05  # largest |lossy - fp32| of a reranker's (activated) score
    max_mean_score_diff: float = 0.01
    min_spearman: float = 0.99  # rank correlation of the gate pairs' scores
    min_top10_overlap: float = 0.9  # share of fp32's 10 best-scored gate pairs among the lossy model's 10 best

    def failures(self, quality: dict[str, float], task: Task = EMBEDDING) -> list[str]:
        return [limit.failure(quality[limit.figure], getattr(self, limit.keyword)) for limit in task.gate.limits
                if limit.fails(quality[limit.figure], getattr(self, limit.keyword))]


def lower_gate(task: Task) -> tuple[str, str]:
    """How to lower ``task``'s gate: the keyword of export_onnx_model / export_openvino_model, and peft-export's
    flags."""
    keywords = [limit.keyword for limit in task.gate.limits]
    return ("gate=QualityGate(" + ", ".join(f"{k}=..." for k in keywords) + ")",
            " / ".join("--" + k.replace("_", "-") for k in keywords))


# The embedder's, kept for callers that name them.
LOWER_GATE, LOWER_GATE_CLI = lower_gate(EMBEDDING)

# fp16 weights lose almost nothing; their gate is never looser than these, whatever the user's gate says.
FP16_MIN_MEAN_COSINE = 0.999
FP16_MAX_SCORE_DIFF = 0.01


def fp16_gate(gate: QualityGate) -> QualityGate:
    """The gate for fp16 candidates: the user's, with the mean cosine raised to at least 0.999 and a reranker's
    largest score difference lowered to at most 0.01."""
    return replace(gate, min_mean_cosine=max(gate.min_mean_cosine, FP16_MIN_MEAN_COSINE),
                   max_score_diff=min(gate.max_score_diff, FP16_MAX_SCORE_DIFF))


def gate_texts(pairs: list[dict[str, str]]) -> list[str]:
    """The texts an embedding gate embeds: the pairs' queries, then their passages."""
    return EMBEDDING.gate.inputs(pairs)


def measure_quality(reference: Embed, candidate: Embed, pairs: list[dict[str, str]], task: Task) -> dict[str, float]:
    """The task's gate figures of ``candidate`` against ``reference`` on the task's inputs of the gate pairs."""
    inputs = task.gate.inputs(pairs)
    return task.quality(reference(inputs), candidate(inputs))


def screen_rows(n_pairs: int, task: Task = EMBEDDING) -> np.ndarray:
    """Rows of the task's gate inputs a candidate is screened on before the full gate."""
    return task.gate.screen_rows(n_pairs)


def screen_failures(screen: dict[str, float], gate: QualityGate, task: Task = EMBEDDING) -> list[str]:
    """Why a screen's figures (the task's, on its screen rows) already rule a candidate out: a worst-case figure
    over its limit is over it on the full set too; an average is only an estimate, so it rejects with a margin."""
    screened = sorted((limit for limit in task.gate.limits if limit.screen_margin is not None),
                      key=lambda limit: limit.screen_margin)  # the exact (worst-case) figures first
    return [limit.failure(screen[limit.figure], getattr(gate, limit.keyword), limit.screen_margin, "screen ")
            for limit in screened if limit.fails(screen[limit.figure], getattr(gate, limit.keyword),
                                                 limit.screen_margin)]


def screen_summary(screen: dict[str, float], rows: int, task: Task) -> dict[str, float]:
    """What an attempt records of its screen: the row count and the screened figures."""
    return {"texts": rows, **{limit.figure: screen[limit.figure] for limit in task.gate.limits
                              if limit.screen_margin is not None}}


def enforce(gate: QualityGate, quality: dict[str, float], what: str, task: Task = EMBEDDING) -> None:
    failures = gate.failures(quality, task)
    if failures:
        lower, lower_cli = lower_gate(task)

        def say(lower: str) -> str:
            return (f"{what} fails the quality gate ({'; '.join(failures)}). Nothing was written. Lower the gate "
                    f"explicitly ({lower}) if this loss is acceptable.")

        raise ValidationError(say(lower)).in_cli_words(say(lower_cli))


def gate_dict(gate: QualityGate, task: Task = EMBEDDING) -> dict[str, float]:
    """The limits that applied to ``task``'s figures, by their QualityGate names."""
    limits = asdict(gate)
    return {limit.keyword: limits[limit.keyword] for limit in task.gate.limits}


def tokenize_inputs(tokenizer, task: Task) -> Callable[[list], dict[str, np.ndarray]]:
    """``inputs -> graph feeds`` for the task's gate inputs (texts, or text pairs where ``task.text_pairs``)."""
    return tokenizer.encode_pairs if task.text_pairs else tokenizer.encode


def encodings_of(tokenizer, task: Task, inputs: list) -> list:
    """The tokenizer's encodings (unpadded) of the task's inputs, to batch with ``tokenizer.batches_of``."""
    return tokenizer.tokenize_pairs(inputs) if task.text_pairs else tokenizer.tokenize(inputs)


def backend_embedder(tokenizer, backend, batch_size: int = 32, task: Task = EMBEDDING) -> Embed:
    """``inputs -> (n, ...)`` of the task's gate output (sentence embeddings; a reranker's scores) from a runtime
    backend, batched exactly as the runtime class batches on a CPU (by token length, longest first, under its
    default token budget), so figures measured here are the ones users reproduce: dynamic int8 picks activation
    scales per batch, so batch composition matters."""
    from ..runtime.model import CPU_MAX_BATCH_TOKENS

    output = task.gate.output

    def embed(inputs: list) -> np.ndarray:
        out = None
        for index, feeds in tokenizer.batches_of(encodings_of(tokenizer, task, inputs), batch_size,
                                                 CPU_MAX_BATCH_TOKENS):
            got = backend.run(feeds, [output])[output]
            if out is None:
                out = np.zeros((len(inputs), *got.shape[1:]), np.float32)
            out[index] = got
        return out if out is not None else np.zeros((0, 0), np.float32)

    return embed


# Standard-library modules whose docstrings are prose; none has side effects at import.
