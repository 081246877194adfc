"""Numeric validation of an export against the PyTorch reference, on shapes not used for tracing.

Shapes are bounded so that a long-context model validates in minutes on a CPU: the one long input runs at batch
1 with up to LONG_MAX_TOKENS tokens (the full max_seq_length for every model up to that length); the rows of
multi-row batches are truncated to BATCHED_MAX_TOKENS. Truncation at the full max_seq_length is checked on the
tokenizer alone (pipeline._check_runtime_tokenizer), which costs no model run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import ValidationError
from ..runtime.similarity import normalize

SENTENCE_TOLERANCE = 1e-5  # on L2-normalised sentence embeddings
TOKEN_TOLERANCE = 1e-4

# Real sentences of very different lengths; the last one is made longer than any max_seq_length.
VALIDATION_TEXTS = [
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
]
BATCH_SIZES = (1, 3, 7)  # tracing used batch 2
LONG_MAX_TOKENS = 2048  # batch 1: attention scores are heads x length^2 floats per layer; 8192 would need GBs
BATCHED_MAX_TOKENS = 256  # each row of a batch of several


@dataclass
class ValidationReport:
    max_diff: dict[str, float] = field(default_factory=dict)
    shapes: list[list[int]] = field(default_factory=list)
    tolerances: dict[str, float] = field(
        default_factory=lambda: {"sentence_embedding": SENTENCE_TOLERANCE, "token_embeddings": TOKEN_TOLERANCE}
    )

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_diff, "tolerances": self.tolerances, "shapes_checked": self.shapes}


def token_limit(batch: list[str]) -> int:
    """The most tokens validation feeds per row of ``batch`` (see the module docstring)."""
    return LONG_MAX_TOKENS if len(batch) == 1 else BATCHED_MAX_TOKENS


def validation_batches(texts: list[str] | None = None) -> list[list[str]]:
    texts = texts or VALIDATION_TEXTS
    batches = []
    for size in BATCH_SIZES:
        # Rotate so every batch mixes short texts with the long (truncated) one.
        start = (size * 2) % len(texts)
        rotated = texts[start:] + texts[:start]
        batches.append(rotated[:size] if size > 1 else [texts[-1]])
    batches.append([texts[0]])  # a one-token-ish input
    # Short texts only: the batches above all hold the truncated long text, so their padding is to the maximum
    # length; this one checks padding at the lengths queries have.
    short = [t for t in texts if len(t) < 200][:5]
    if len(short) > 1:
        batches.append(short)
    return batches


@dataclass
class ReferenceBatch:
    feeds: dict[str, np.ndarray]
    sentence_embedding: np.ndarray  # (batch, dim)
    token_embeddings: np.ndarray  # (batch, seq, hidden)


def reference_outputs(
    reference: torch.nn.Module, tokenize: Callable[..., dict[str, np.ndarray]], texts: list[str] | None = None
) -> list[ReferenceBatch]:
    """Run the PyTorch reference once on every validation batch; ``tokenize(texts, max_length)`` truncates to
    the smaller of ``max_length`` and the model's max_seq_length."""
    batches = []
    for batch in validation_batches(texts):
        feeds = tokenize(batch, token_limit(batch))
        with torch.no_grad():
            sentence, tokens = reference(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        batches.append(ReferenceBatch(feeds, sentence.numpy(), tokens.numpy()))
    return batches


def torch_runner(module: torch.nn.Module) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            sentence, tokens = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return {"sentence_embedding": sentence.numpy(), "token_embeddings": tokens.numpy()}

    return run


def compare_with_reference(
    references: list[ReferenceBatch],
    run_graph: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    what: str = "The exported graph",
    tolerances: dict[str, float] | None = None,
) -> ValidationReport:
    """Run ``run_graph`` on each reference batch; raise once, listing every output over its tolerance."""
    report = ValidationReport()
    if tolerances:
        report.tolerances = dict(tolerances)
    worst = {name: 0.0 for name in report.tolerances}
    for ref in references:
        report.shapes.append(list(ref.feeds["input_ids"].shape))
        got = run_graph(ref.feeds)
        mask = ref.feeds["attention_mask"].astype(bool)
        diffs = {
            "sentence_embedding": np.abs(normalize(got["sentence_embedding"])
                                         - normalize(ref.sentence_embedding)).max(),
            "token_embeddings": np.abs(got["token_embeddings"][mask] - ref.token_embeddings[mask]).max(),
        }
        for name in worst:
            value = float(diffs[name])
            worst[name] = max(worst[name], value if np.isfinite(value) else float("inf"))
    report.max_diff = worst
    failures = [f"{name}: max abs diff {value:.3g} > {report.tolerances[name]:g}"
                for name, value in worst.items() if not value <= report.tolerances[name]]
    if failures:
        raise ValidationError(
            f"{what} does not match the PyTorch reference (unmerged PEFT) on input shapes {report.shapes}: "
            + "; ".join(failures)
        )
    return report


def max_sentence_difference(references: list[ReferenceBatch], run_graph) -> float:
    """Largest difference of normalised sentence embeddings between ``run_graph`` and the references; inf when
    either side is not finite (a NaN difference would otherwise compare as no difference at all)."""
    worst = 0.0
    for ref in references:
        got = run_graph(ref.feeds)["sentence_embedding"]
        value = float(np.abs(normalize(got) - normalize(ref.sentence_embedding)).max())
        worst = max(worst, value if np.isfinite(value) else float("inf"))
    return worst


def check_finite_outputs(references: list[ReferenceBatch], what: str, hint: str = "") -> None:
    """Raise ValidationError naming the output and the input shape where ``references`` hold NaN or Inf."""
    for ref in references:
        for name in ("sentence_embedding", "token_embeddings"):
            if not np.isfinite(getattr(ref, name)).all():
                raise ValidationError(
                    f"{what} produces non-finite values (NaN/Inf) in {name} on input shape "
                    f"{list(ref.feeds['input_ids'].shape)}{hint}"
                )
