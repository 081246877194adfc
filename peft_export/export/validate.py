"""Numeric validation of an export against the PyTorch reference, on shapes not used for tracing.

Shapes are bounded so that a long-context model validates in minutes on a CPU: the one long input runs at batch
1 with up to LONG_MAX_TOKENS tokens (the full max_seq_length for every model up to that length); the rows of
multi-row batches are truncated to BATCHED_MAX_TOKENS. Truncation at the full max_seq_length is checked on the
tokenizer alone (tokenizer_files.check_runtime_tokenizer), which costs no model run.

What is compared, and how closely, is the task's (tasks/): its graph outputs, their tolerances, its validation
texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import ValidationError
from ..tasks import EMBEDDING, Task

BATCH_SIZES = (1, 3, 7)  # tracing used batch 2
LONG_MAX_TOKENS = 2048  # batch 1: attention scores are heads x length^2 floats per layer; 8192 would need GBs
BATCHED_MAX_TOKENS = 256  # each row of a batch of several


@dataclass
class ValidationReport:
    tolerances: dict[str, float]
    max_diff: dict[str, float] = field(default_factory=dict)
    shapes: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_diff, "tolerances": self.tolerances, "shapes_checked": self.shapes}


def token_limit(batch: list[str]) -> int:
    """The most tokens validation feeds per row of ``batch`` (see the module docstring)."""
    return LONG_MAX_TOKENS if len(batch) == 1 else BATCHED_MAX_TOKENS


def validation_batches(texts: list[str] | None = None, task: Task = EMBEDDING) -> list[list[str]]:
    texts = list(texts or task.validation_texts)
    batches = []
    for size in BATCH_SIZES:
        # Rotate so every batch mixes short texts with the long (truncated) one.
        start = (size * 2) % len(texts)
        rotated = texts[start:] + texts[:start]
        batches.append(rotated[:size] if size > 1 else [texts[-1]])
    batches.append([texts[0]])  # a one-token-ish input
    # Short texts only: the batches above all hold the truncated long text, so their padding is to the maximum
    # length; this one checks padding at the lengths queries have.
    short = [t for t in texts if _characters(t) < 200][:5]
    if len(short) > 1:
        batches.append(short)
    return batches


def _characters(text) -> int:
    """Characters of a validation input: a text, or a (first, second) pair of texts."""
    return len(text) if isinstance(text, str) else sum(len(part) for part in text)


@dataclass
class ReferenceBatch:
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]  # the task's graph outputs, by name


def _run_module(module: torch.nn.Module, feeds: dict[str, np.ndarray], task: Task) -> dict[str, np.ndarray]:
    with torch.no_grad():
        values = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return {name: value.numpy() for name, value in zip(task.output_names, values)}


def reference_outputs(reference: torch.nn.Module, tokenize: Callable[..., dict[str, np.ndarray]],
                      texts: list[str] | None = None, task: Task = EMBEDDING) -> list[ReferenceBatch]:
    """Run the PyTorch reference once on every validation batch; ``tokenize(texts, max_length)`` truncates to
    the smaller of ``max_length`` and the model's max_seq_length."""
    batches = []
    for batch in validation_batches(texts, task):
        feeds = tokenize(batch, token_limit(batch))
        batches.append(ReferenceBatch(feeds, _run_module(reference, feeds, task)))
    return batches


def torch_runner(module: torch.nn.Module, task: Task = EMBEDDING
                 ) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    return lambda feeds: _run_module(module, feeds, task)


def compare_with_reference(
    references: list[ReferenceBatch],
    run_graph: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    what: str = "The exported graph",
    tolerances: dict[str, float] | None = None,
    task: Task = EMBEDDING,
) -> ValidationReport:
    """Run ``run_graph`` on each reference batch; raise once, listing every output over its tolerance (the
    task's, or ``tolerances`` where given)."""
    report = ValidationReport(tolerances={**task.tolerances, **(tolerances or {})})
    worst = {name: 0.0 for name in report.tolerances}
    for ref in references:
        report.shapes.append(list(ref.feeds["input_ids"].shape))
        diffs = task.differences(ref.outputs, run_graph(ref.feeds), ref.feeds["attention_mask"])
        for name in worst:
            worst[name] = max(worst[name], diffs[name])
    report.max_diff = worst
    failures = [f"{name}: max abs diff {value:.3g} > {report.tolerances[name]:g}"
                for name, value in worst.items() if not value <= report.tolerances[name]]
    if failures:
        raise ValidationError(
            f"{what} does not match the PyTorch reference (unmerged PEFT) on input shapes {report.shapes}: "
            + "; ".join(failures)
        )
    return report


def max_main_difference(references: list[ReferenceBatch], run_graph, task: Task = EMBEDDING) -> float:
    """Largest difference of the task's main output (its first: the sentence embedding, compared normalised)
    between ``run_graph`` and the references; inf when either side is not finite (a NaN difference would otherwise
    compare as no difference at all)."""
    main = task.outputs[0]
    worst = 0.0
    for ref in references:
        value = float(main.difference(ref.outputs[main.name], run_graph(ref.feeds)[main.name],
                                      ref.feeds["attention_mask"]))
        worst = max(worst, value if np.isfinite(value) else float("inf"))
    return worst


def check_finite_outputs(references: list[ReferenceBatch], what: str, hint: str = "") -> None:
    """Raise ValidationError naming the output and the input shape where ``references`` hold NaN or Inf."""
    for ref in references:
        for name, value in ref.outputs.items():
            if not np.isfinite(value).all():
                raise ValidationError(
                    f"{what} produces non-finite values (NaN/Inf) in {name} on input shape "
                    f"{list(ref.feeds['input_ids'].shape)}{hint}"
                )
