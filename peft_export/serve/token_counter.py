"""Token counts for admission: :class:`~peft_export.runtime.token_prefix.TokenCounter` (the runtime's prefix
tokenization, which ``encode`` shares) on a served model, or the model's own ``count_tokens``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..runtime.token_prefix import TokenCounter

__all__ = ["TokenCounter", "counter_for"]


def counter_for(model: Any, max_tokens: int) -> TokenCounter | Callable[[list[str]], list[int]] | None:
    """A TokenCounter on the model's ``tokenizers`` tokenizer, the model's own ``count_tokens`` if it has one, or
    None when it has neither."""
    if hasattr(model, "count_tokens"):
        return model.count_tokens
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "to_str"):
        return None
    lower = bool(getattr(getattr(model, "config", None), "do_lower_case", False))
    return TokenCounter(tokenizer, max_tokens, lower)
