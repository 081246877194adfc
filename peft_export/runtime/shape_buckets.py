"""Shape buckets: pad a batch's inputs up to one of a few lengths and batch sizes, so OpenVINO meets few shapes.

OpenVINO's CPU plugin compiles kernels for each new input shape and re-plans a run when the shape changes. A
server or a corpus pass sees a new sequence length almost every batch: on all-MiniLM-L6-v2 the first pass over
1,000 real texts ran at 317 texts/s and later passes at 690-760/s. Padding lengths up to buckets (powers of two
and 1.5x powers of two from 16: 16, 24, 32, 48, 64, 96, ...; at most the model's max_seq_length) and batch sizes
up to powers of two bounds the distinct shapes to a handful per octave.

Padding does not change results: added tokens carry attention mask 0 and the pad token id, added rows are whole
padding rows, and both are cropped from every output. The padding goes on the side the batch is already padded
on (left-padded batches get more on the left), and on the right for a batch without padding, as the runtime's
tokenizer pads; last-token pooling takes the last token with mask 1, which right padding does not move.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SMALLEST_BUCKET = 16


def length_bucket(length: int, limit: int | None) -> int:
    """The smallest bucket >= ``length`` (16, 24, 32, 48, 64, 96, ...), never above ``limit`` nor below length."""
    bucket = SMALLEST_BUCKET
    while bucket < length:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3  # 2^k -> 1.5*2^k -> 2^(k+1)
    if limit is not None:
        bucket = min(bucket, max(limit, length))
    return bucket


def batch_bucket(batch: int) -> int:
    """The smallest power of two >= ``batch``."""
    return 1 << max(batch - 1, 0).bit_length()


@dataclass(frozen=True)
class Padding:
    """What was added to a batch, so that :meth:`crop` can take it off the outputs again."""

    rows: int
    length: int
    added_rows: int
    added_columns: int
    left: bool

    def crop(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cropped = {}
        for name, value in outputs.items():
            value = value[: self.rows] if self.added_rows else value
            if self.added_columns and value.ndim >= 3:  # (batch, sequence, hidden)
                value = value[:, self.added_columns:] if self.left else value[:, : self.length]
            cropped[name] = np.ascontiguousarray(value) if value.base is not None else value
        return cropped


def pad_to_buckets(feeds: dict[str, np.ndarray], pad_token_id: int, max_length: int | None,
                   bucket_batches: bool = True) -> tuple[dict[str, np.ndarray], Padding]:
    """``feeds`` padded to bucketed (batch, sequence) and the :class:`Padding` that undoes it on outputs."""
    mask = feeds["attention_mask"]
    rows, length = mask.shape
    target_rows = batch_bucket(rows) if bucket_batches else rows
    target_length = length_bucket(length, max_length)
    left = bool(length and (mask[:, 0] == 0).any() and (mask[:, -1] != 0).all())
    padding = Padding(rows, length, target_rows - rows, target_length - length, left)
    if not padding.added_rows and not padding.added_columns:
        return feeds, padding
    padded = {}
    for name, value in feeds.items():
        fill = pad_token_id if name == "input_ids" else 0
        out = np.full((target_rows, target_length), fill, dtype=value.dtype)
        columns = slice(target_length - length, None) if left else slice(0, length)
        out[:rows, columns] = value
        padded[name] = out
    if padding.added_rows:
        # Padding rows hold one unmasked pad token, so no row is all masked (pooling divides by the mask's sum).
        padded["attention_mask"][rows:, -1 if left else 0] = 1
    return padded, padding
