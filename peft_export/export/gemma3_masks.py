"""Gemma3's bidirectional attention masks (EmbeddingGemma), built with plain broadcasting so tracers can record them.

transformers (``Gemma3TextModel.forward`` with ``use_bidirectional_attention``) composes them from mask functions
that it expands with ``torch.vmap``:

* full-attention layers: ``causal OR always`` (so every position), AND the padding mask;
* sliding-window layers: ``causal sliding window (q - W < kv <= q) OR bidirectional window (|q - kv| < W)``, AND
  the padding mask, where ``W`` is ``config.sliding_window`` as transformers' config holds it (with bidirectional
  attention the config turns the stored window ``w`` into ``w // 2 + 1``).

For eager attention the boolean masks become additive float masks: 0 where attention is allowed, the dtype's
minimum elsewhere, shape (batch, 1, query, key). The same compositions are written out below; tests compare them
with transformers' own masks, and every export is validated against the eager model.
"""

from __future__ import annotations

import torch


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (batch, 1, query, key) -> 0 where allowed, the dtype's minimum elsewhere (transformers' eager_mask)."""
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def bidirectional_masks(config, attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32
                        ) -> dict[str, torch.Tensor]:
    """{"full_attention", "sliding_attention"} additive masks for a (batch, seq) padding mask (1 = token)."""
    seq = attention_mask.shape[1]
    padding = attention_mask.to(torch.bool)[:, None, None, :]  # (batch, 1, 1, key)
    q_idx = torch.arange(seq, device=attention_mask.device).view(-1, 1)  # (query, 1)
    kv_idx = torch.arange(seq, device=attention_mask.device).view(1, -1)  # (1, key)
    window = config.sliding_window
    causal_window = (kv_idx <= q_idx) & (kv_idx > q_idx - window)
    bidirectional_window = (q_idx - kv_idx).abs() < window
    sliding = (causal_window | bidirectional_window)[None, None]  # (1, 1, query, key)
    full = padding.expand(-1, 1, seq, seq)  # (batch, 1, query, key)
    return {"full_attention": _additive(full, dtype), "sliding_attention": _additive(sliding & padding, dtype)}
