"""The last encoder layer computed for the first token alone, while a model whose output reads only that token is
traced.

A BERT-like sequence classifier (BERT's pooler, RoBERTa's / XLM-R's head, as a CrossEncoder loads them) reads the
final hidden state of the first token ([CLS] / <s>) and nothing else. In the last layer, the other tokens' rows
still matter as keys and values, but their queries, attention outputs and feed-forward blocks are computed and
thrown away: on all-MiniLM-L6-v2 (6 layers) that is about 14% of the model's arithmetic. While tracing, the last
layer's forward is replaced by one that projects keys and values from every token and runs everything else on the
first row: the same operations on fewer rows, so the traced graph computes the same logits (every export is still
compared with the unpatched eager model, within the task's tolerance).

Only layers of the BERT layout are patched (``attention.self.{query,key,value}``, ``attention.output``,
``intermediate``, ``output``: BERT, RoBERTa, XLM-R and their copies in transformers), with absolute positions and no
cross-attention; any other layout is traced whole. The patched forward calls the layer's own submodules, so merged
weights, PEFT's LoRA layers and the switchable export's adapter inputs work unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _bert_layout(layer: nn.Module) -> bool:
    attention = getattr(layer, "attention", None)
    self_attention = getattr(attention, "self", None)
    return (all(hasattr(self_attention, name) for name in ("query", "key", "value", "attention_head_size"))
            and hasattr(attention, "output") and hasattr(layer, "intermediate") and hasattr(layer, "output")
            and getattr(self_attention, "position_embedding_type", "absolute") == "absolute"
            and not getattr(layer, "is_decoder", False) and not hasattr(layer, "crossattention"))


def last_layer(model: nn.Module) -> nn.Module | None:
    """The last layer of the one stack of BERT-layout layers in ``model`` (a PEFT wrapper included), or None."""
    stacks = [module for module in model.modules()
              if isinstance(module, nn.ModuleList) and len(module) and all(_bert_layout(m) for m in module)]
    return stacks[0][-1] if len(stacks) == 1 else None


def _first_token_forward(layer: nn.Module):
    self_attention = layer.attention.self
    head_size = self_attention.attention_head_size
    scaling = getattr(self_attention, "scaling", head_size ** -0.5)

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        batch, length = hidden_states.shape[0], hidden_states.shape[1]
        first = hidden_states[:, :1]
        query = self_attention.query(first).view(batch, 1, -1, head_size).transpose(1, 2)
        key = self_attention.key(hidden_states).view(batch, length, -1, head_size).transpose(1, 2)
        value = self_attention.value(hidden_states).view(batch, length, -1, head_size).transpose(1, 2)
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:  # eager attention's additive mask, (batch, 1, 1 or length, length)
            if attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros_like(attention_mask, dtype=weights.dtype).masked_fill(
                    ~attention_mask, torch.finfo(weights.dtype).min)
            weights = weights + attention_mask[:, :, :1, :]
        context = torch.matmul(torch.softmax(weights, dim=-1), value).transpose(1, 2).reshape(batch, 1, -1)
        attention_output = layer.attention.output(context, first)
        return layer.output(layer.intermediate(attention_output), attention_output)

    return forward


@contextlib.contextmanager
def first_token_last_layer(model: nn.Module) -> Iterator[bool]:
    """While active, ``model``'s last BERT-layout layer returns the first token's row only (batch, 1, hidden).
    Yields whether a layer was patched; the model is restored on exit."""
    layer = last_layer(model)
    if layer is None:
        yield False
        return
    layer.forward = _first_token_forward(layer)
    try:
        yield True
    finally:
        del layer.forward
