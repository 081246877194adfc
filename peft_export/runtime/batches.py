"""Batch planning for ``encode``: longest inputs first, each batch capped in sentences and, optionally, in tokens."""

from __future__ import annotations

import numpy as np

# Tokens of padding an input may get in a shared batch before it goes to the next one (or a quarter of the batch's
# longest input, whichever is more).
MIN_PADDING_SLACK = 16


def plan_batches(lengths: list[int], batch_size: int, max_batch_tokens: int | None = None) -> list[np.ndarray]:
    """Split the indices of ``lengths`` (token counts) into batches of similar lengths, longest first.

    A batch holds at most ``batch_size`` inputs and, with ``max_batch_tokens``, at most that many tokens once
    padded (inputs x its longest input), so a few long inputs never make one huge padded batch; an input longer
    than the budget still gets a batch of its own, and under a budget an input whose padding would exceed a quarter
    of the batch's longest input (and 16 tokens) starts the next batch. The order is stable, so equal lengths keep
    their input order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, found {batch_size!r}")
    if max_batch_tokens is not None and (isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int)
                                         or max_batch_tokens < 1):
        raise ValueError(f"max_batch_tokens must be a positive integer or None, found {max_batch_tokens!r}")
    order = np.argsort([-n for n in lengths], kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = max(lengths[order[start]], 1)  # the longest of this batch: it sets the padding
        size = batch_size if max_batch_tokens is None else max(1, min(batch_size, max_batch_tokens // width))
        if max_batch_tokens is not None:
            # Under a token budget, also stop before an input that would be mostly padding: one more session
            # run costs about as much as a few dozen tokens, padding a 20-token text to 256 costs 236.
            slack = max(MIN_PADDING_SLACK, width // 4)
            end = start + 1
            while end < min(start + size, len(order)) and width - lengths[order[end]] <= slack:
                end += 1
            size = end - start
        batches.append(order[start : start + size])
        start += size
    return batches
