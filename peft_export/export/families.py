"""Model families: each family's export quirks in one small entry, looked up by ``config.model_type``.

An entry says how the encoder is loaded for export (eager attention, the key/value cache off for decoders), what
has to be patched while tracing (a mask transformers builds in a way tracers cannot follow), where positions start,
how its attention blocks are fused for ONNX Runtime, and the family's usual LoRA targets, pooling and padding
side (documentation and test fixtures read these; the pipeline reads pooling and padding from the model's own
Sentence Transformers files). The export stages ask :func:`family_of` and never branch on a model type.

This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import PeftExportError, ToolError


@dataclass(frozen=True)
class ModelFamily:
    """The default entry suits BERT-like encoders: eager attention, positions from 0, ONNX Runtime's BERT
    optimizer then runtime/onnxruntime_attention_rewrite.py for the attention blocks it leaves (the fused graph is
    kept only if it still matches the reference)."""

    name: str
    model_types: tuple[str, ...] = ()
    transformers_class: str = ""
    lora_targets: tuple[str, ...] = ("query", "key", "value", "dense")
    pooling: str = "mean"
    padding_side: str = "right"
    position_offset: int = 0  # positions used before the first token (RoBERTa-likes start after the padding index)
    # "bert": ONNX Runtime's BERT optimizer, then runtime/onnxruntime_attention_rewrite.py for what it leaves;
    # "rewrite": the rewrite alone (the optimizer's other BERT patterns are not meant for rotary / RMSNorm models).
    attention_fusion: str = "bert"
    decoder: bool = False  # a decoder-only model: loaded with its key/value cache off
    load_options: dict[str, Any] = field(default_factory=lambda: {"attn_implementation": "eager"})
    # Module paths (within one layer) of the feed-forward block's projections: the int8 ladders keep the output
    # projection, then the whole block, in float when quantizing everything loses too much.
    ffn_output: tuple[str, ...] = ("output.dense",)
    ffn_input: tuple[str, ...] = ("intermediate.dense",)
    # Its sequence-classification head reads only the first token's final state (BERT's pooler, RoBERTa's head on
    # <s>): a reranker of this family is traced with its last layer computed for that token (first_token_layer.py).
    first_token_head: bool = False

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AutoModel.from_pretrained`` when loading this family for export."""
        kwargs = dict(self.load_options)
        if self.decoder:
            # A cache makes the traced graph build key/value tensors (and OpenVINO inputs) no embedding reads.
            kwargs["use_cache"] = False
        return kwargs

    @contextlib.contextmanager
    def tracing(self, encoder) -> Iterator[None]:
        """Patches the encoder needs while a tracer (torch.onnx, OpenVINO's frontend) records it; none by default."""
        yield

    def ffn_part(self, node: str) -> str | None:
        """"output" or "input" when the graph node ``node`` (an ONNX node name such as
        ``/encoder/layer.0/output/dense/MatMul`` or an OpenVINO friendly name such as
        ``__module.encoder.layers.0.mlp.down_proj/aten::linear/MatMul``) belongs to a feed-forward projection."""
        path = "." + node.replace("/", ".") + "."
        if ".attention." in path:  # BERT's attention.output.dense is not the FFN's
            return None
        if any(f".{module}." in path for module in self.ffn_output):
            return "output"
        if any(f".{module}." in path for module in self.ffn_input):
            return "input"
        return None

    @property
    def bert_optimizer(self) -> bool:
        """Whether ONNX Runtime's BERT optimizer runs before the attention rewrite."""
        return self.attention_fusion == "bert"


class BidirectionalGemma3(ModelFamily):
    """Gemma3 text models; with ``use_bidirectional_attention`` (EmbeddingGemma) transformers builds the masks with
    ``torch.vmap``, which neither torch.onnx's tracer nor OpenVINO's frontend can record. While tracing, the masks
    are built by :func:`peft_export.export.gemma3_masks.bidirectional_masks` and handed to the model's forward,
    which accepts prepared masks. Validation against the eager model (transformers' own masks) proves them equal."""

    @contextlib.contextmanager
    def tracing(self, encoder) -> Iterator[None]:
        if not getattr(encoder.config, "use_bidirectional_attention", False):
            yield
            return
        from .gemma3_masks import bidirectional_masks

        def prepared_masks(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is None or isinstance(mask, dict):
                return None
            embeds = module.get_input_embeddings()
            kwargs["attention_mask"] = bidirectional_masks(module.config, mask, embeds.weight.dtype)
            return args, kwargs

        handle = encoder.register_forward_pre_hook(prepared_masks, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


_DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_GATED_MLP = dict(ffn_output=("mlp.down_proj",), ffn_input=("mlp.gate_proj", "mlp.up_proj"))
_ROTARY_DECODER = dict(lora_targets=_DECODER_TARGETS, pooling="lasttoken", padding_side="left",
                       attention_fusion="rewrite", decoder=True, **_GATED_MLP)

DEFAULT_FAMILY = ModelFamily("bert-like", ("bert",), "BertModel", first_token_head=True)

FAMILIES: tuple[ModelFamily, ...] = (
    DEFAULT_FAMILY,
    ModelFamily("distilbert", ("distilbert",), "DistilBertModel",
                lora_targets=("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"), ffn_output=("ffn.lin2",),
                ffn_input=("ffn.lin1",)),
    ModelFamily("roberta", ("roberta", "xlm-roberta", "camembert", "longformer"), "RobertaModel / XLMRobertaModel",
                pooling="cls", position_offset=2, first_token_head=True),
    ModelFamily("mpnet", ("mpnet",), "MPNetModel", lora_targets=("q", "k", "v", "o"), position_offset=2),
    ModelFamily("modernbert", ("modernbert",), "ModernBertModel", lora_targets=("Wqkv", "Wo", "Wi"),
                attention_fusion="rewrite", ffn_output=("mlp.Wo",), ffn_input=("mlp.Wi",)),
    ModelFamily("qwen3", ("qwen3",), "Qwen3Model", **_ROTARY_DECODER),
    ModelFamily("llama", ("llama", "mistral"), "MistralModel", **_ROTARY_DECODER),
    BidirectionalGemma3("gemma3", ("gemma3_text",), "Gemma3TextModel", lora_targets=_DECODER_TARGETS,  # mean pooling
                        attention_fusion="rewrite", decoder=True, **_GATED_MLP),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_for(model_type: str | None) -> ModelFamily:
    """The entry for ``model_type``; unknown types get the BERT-like default (every export is validated anyway)."""
    return _BY_MODEL_TYPE.get(model_type or "", DEFAULT_FAMILY)


def family_of(model) -> ModelFamily:
    """The entry for a loaded transformers model (or anything with a ``config.model_type``)."""
    return family_for(getattr(getattr(model, "config", None), "model_type", None))


@contextlib.contextmanager
def tracing_step(encoder, step: str) -> Iterator[None]:
    """Apply the family's tracing patches and turn a tracer's failure into one ToolError naming the model type and
    the step (e.g. "Tracing to ONNX"), instead of a traceback from inside torch or OpenVINO."""
    model_type = getattr(getattr(encoder, "config", None), "model_type", None) or type(encoder).__name__
    what = f"{step} of the {model_type!r} model ({type(encoder).__name__})"
    try:
        with family_of(encoder).tracing(encoder):
            yield
    except PeftExportError:
        raise
    except Exception as err:  # a tracer's own failure, often one line from deep inside C++ ("unordered_map::at")
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        raise ToolError(
            f"{what} failed: {type(err).__name__}: {first_line}. This model cannot be traced as loaded; a model "
            "type that needs a traceable replacement (for example of a mask built with torch.vmap) needs an entry "
            "in peft_export/export/families.py. Nothing was written."
        ) from err


@contextlib.contextmanager
def tracing_pipeline(pipeline, step: str) -> Iterator[None]:
    """:func:`tracing_step` for a task's torch module; a module whose output reads only the first token's final
    state (``pipeline.reads_first_token_only``) of a family whose head does so is traced with its last layer
    computed for that token alone (export/first_token_layer.py)."""
    encoder = pipeline.encoder
    model_type = getattr(getattr(encoder, "config", None), "model_type", None)
    family = family_for(model_type)
    prune = (getattr(pipeline, "reads_first_token_only", False) and family.first_token_head
             and model_type in family.model_types)
    with tracing_step(encoder, step), contextlib.ExitStack() as stack:
        if prune:
            from .first_token_layer import first_token_last_layer

            stack.enter_context(first_token_last_layer(encoder))
        yield
