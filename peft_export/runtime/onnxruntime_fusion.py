"""Attention fusion for ONNX Runtime on the CPU, with ONNX Runtime's own transformer optimizer.

torch.onnx writes each self-attention block as ~30 small operators (MatMuls for query/key/value, Reshape and
Transpose per head, scale, mask Add, Softmax, and the shape arithmetic behind each Reshape). ONNX Runtime does not
fuse them when it loads the graph: its session-time AttentionFusion does not match the pattern transformers 5
produces. ``onnxruntime.transformers.optimizer`` does, offline, and packs query/key/value into one ``Attention``
contrib operator per layer (all-MiniLM-L6-v2: 533 nodes in the file -> 100).

Measured on all-MiniLM-L6-v2 + the demo adapter, 2-core AVX-512 Xeon, ONNX Runtime 1.32, one run of
``benchmarks/investigations/bench_ort_kernels.py``: fp32 batch 1 2.03 -> 1.77 ms, batch 32 245 -> 256 sentences/s; with
dynamic int8 (``Attention`` becomes ``QAttention``) batch 1 1.32 -> 1.10 ms, batch 32 590 -> 613 /s. fp32 results stay
within 2e-7 of the traced graph.

Options chosen, and why:

* ``SkipLayerNormalization`` and ``EmbedLayerNormalization`` fusions are off: ONNX Runtime's CPU kernels for them
  are slower than the Add and LayerNormalization they replace (see ``SessionSettings.fuse_skip_layer_norm``).
* The attention mask stays a 2-D 0/1 mask (``AttentionMaskFormat.AttentionMask``) instead of per-row lengths, so
  any mask the tokenizer produces means what it means in PyTorch.
* ``opt_level=0``: only the optimizer's pattern fusions are written to the file; ONNX Runtime applies its own
  hardware-specific optimizations at load time, as for any graph.
* GELU stays exact (no tanh approximation).

The optimizer fuses BERT, RoBERTa and DistilBERT blocks only; the blocks it leaves (MPNet's relative position bias,
XLM-R's transformers-5 mask, rotary and grouped-query attention) are fused afterwards by
runtime/onnxruntime_attention_rewrite.py into ``Attention`` or ``MultiHeadAttention`` with an ``attention_bias`` input;
families whose registry entry says ``attention_fusion="rewrite"`` (rotary models) skip the optimizer and get the rewrite
alone.

The fused graph uses ``com.microsoft`` operators that ONNX Runtime (CPU and CUDA) and OpenVINO's ONNX reader run (the
rewrite's forms checked on the tiny MPNet and Qwen3 graphs). Callers validate it against the PyTorch reference
before keeping it.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

FUSED_OPERATORS = ("Attention", "MultiHeadAttention", "BiasGelu", "LayerNormalization")


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    hidden_size: int

    @classmethod
    def of(cls, config: Any) -> AttentionShape | None:
        """From a transformers config; None for models without plain multi-head self-attention."""
        heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
        if not isinstance(heads, int) or not isinstance(hidden, int) or heads <= 0 or hidden % heads:
            return None
        return cls(heads, hidden)

    def to_dict(self) -> dict[str, int]:
        return {"num_heads": self.num_heads, "hidden_size": self.hidden_size}


def fuse_attention(model, shape: AttentionShape, keep_input: bool = True, bert_optimizer: bool = True,
                   pack_with_bias: bool = True, weights_dir: str = ""):
    """``(fused ModelProto, {operator: count})`` for an ONNX ModelProto; the input model is left unchanged
    unless ``keep_input`` is False (then it is rewritten in place, which saves a copy of a large model's weights).

    With ``bert_optimizer`` ONNX Runtime's optimizer runs first (BERT, RoBERTa, DistilBERT blocks become
    ``Attention``); the blocks it leaves (MPNet's position bias, rotary and grouped-query attention, local windows)
    are then fused by runtime/onnxruntime_attention_rewrite.py (``pack_with_bias=False`` for graphs that int8
    quantization follows: see there). ``fused_blocks(counts)`` is 0 when nothing was fused. Without the BERT
    optimizer ``model`` may be a graph loaded without its external data, kept in ``weights_dir``."""
    import copy

    from .onnxruntime_attention_rewrite import fuse_remaining_attention

    source = copy.deepcopy(model) if keep_input else model
    if not bert_optimizer:
        counts = {op: 0 for op in FUSED_OPERATORS}
        counts.update(fuse_remaining_attention(source, shape.num_heads, pack_with_bias, weights_dir))
        return source, counts
    fused, counts = _ort_optimizer(source, shape)
    for op, count in fuse_remaining_attention(fused, shape.num_heads, pack_with_bias).items():
        counts[op] += count
    return fused, counts


def fused_blocks(counts: dict[str, int]) -> int:
    """Attention blocks fused, of either form."""
    return counts.get("Attention", 0) + counts.get("MultiHeadAttention", 0)


def _ort_optimizer(source, shape: AttentionShape):
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    options.enable_embed_layer_norm = False
    options.enable_gelu_approximation = False
    options.attention_mask_format = AttentionMaskFormat.AttentionMask
    optimizer = optimize_model(source, model_type="bert", num_heads=shape.num_heads,
                               hidden_size=shape.hidden_size, optimization_options=options, opt_level=0)
    stats = optimizer.get_fused_operator_statistics()
    counts = {op: int(stats.get(op, 0)) for op in FUSED_OPERATORS}
    optimizer.topological_sort()  # as the optimizer's own save does
    fused = optimizer.model
    if not any(opset.domain == "com.microsoft" for opset in fused.opset_import):
        fused.opset_import.add(domain="com.microsoft", version=1)
    # The optimizer's fusion objects reference each other, so the graph copies they hold (a model's size each)
    # outlive this call until a garbage collection: measured +230 MB per merge_adapter call without this.
    del optimizer
    gc.collect()
    return fused, counts
