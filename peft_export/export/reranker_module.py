"""The reranker task's torch module: a transformers sequence-classification model (encoder + its classification
head, as sentence-transformers' CrossEncoder loads it) returning the raw logits and the scores the CrossEncoder's
activation makes of them, so one graph gives both ``predict()`` defaults and ``activation_fn`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UnsafeModelError
from .pair_template import chat_pair_template, default_prompt, prompted_pair_template, unprompted_pair_template

# config_sentence_transformers.json's activation_fn -> (runtime name, torch module). Anything else would need an
# import of user-chosen code, which sentence-transformers itself only does under trust_remote_code.
ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": ("sigmoid", nn.Sigmoid),
    "torch.nn.modules.linear.Identity": ("identity", nn.Identity),
    "torch.nn.modules.activation.Tanh": ("tanh", nn.Tanh),
}


def activation_name(activation_fn: Any, num_labels: int, where: str) -> str:
    """The runtime's name of the activation a CrossEncoder applies to its logits: the one its config names, else
    sentence-transformers' default (sigmoid for one label, identity for several)."""
    if activation_fn is None:
        return "sigmoid" if num_labels == 1 else "identity"
    if not isinstance(activation_fn, str) or activation_fn not in ACTIVATIONS:
        raise UnsafeModelError(
            f"{where}: activation_fn {activation_fn!r} is not one of the torch activations peft_export exports "
            f"({', '.join(sorted(ACTIVATIONS))}); save the CrossEncoder with one of them")
    return ACTIVATIONS[activation_fn][0]


def configured_activation(pipeline, model_config, pipeline_folder: Path, encoder_folder: Path) -> tuple[Any, str]:
    """The activation_fn path a CrossEncoder loads with, and the file that names it, in sentence-transformers' order:
    config_sentence_transformers.json's ``activation_fn``; else the model's config.json, as sentence-transformers 4
    and 5 (``"sentence_transformers": {"activation_fn": ...}``) and earlier versions
    (``sbert_ce_default_activation_function``) saved it; else None (the default for the number of labels)."""
    if pipeline.activation_fn is not None:
        return pipeline.activation_fn, str(pipeline_folder / "config_sentence_transformers.json")
    where = str(encoder_folder / "config.json")
    saved = getattr(model_config, "sentence_transformers", None)
    if isinstance(saved, dict) and saved.get("activation_fn") is not None:
        return saved["activation_fn"], f"{where} (sentence_transformers.activation_fn)"
    legacy = getattr(model_config, "sbert_ce_default_activation_function", None)
    return legacy, f"{where} (sbert_ce_default_activation_function)"


def label_names(id2label: dict | None, num_labels: int) -> dict[str, str]:
    """The label of each logit, keyed "0".."num_labels-1" as config.json writes them (servers answer TEI's /predict
    with them): the model config's ``id2label``, transformers' own default ``LABEL_i`` for any it lacks."""
    given = {str(key): str(value) for key, value in (id2label or {}).items()}
    return {str(i): given.get(str(i), f"LABEL_{i}") for i in range(num_labels)}


class RerankerPipeline(nn.Module):
    """sequence-classification model -> (logits, activation(logits)), each (batch, num_labels)."""

    def __init__(self, encoder: nn.Module, activation: str, uses_token_type_ids: bool,
                 pair_template: dict[str, Any] | None = None, query_prompt: str | None = None,
                 prompt_settings: dict[str, Any] | None = None):
        super().__init__()
        self.pair_template = pair_template
        self.query_prompt = query_prompt
        self.prompt_settings = prompt_settings or {}
        self.encoder = encoder
        self.activation_name = activation
        self.activation = {name: module for name, module in ACTIVATIONS.values()}[activation]()
        self.uses_token_type_ids = uses_token_type_ids

    @property
    def reads_first_token_only(self) -> bool:
        """The graph's outputs are the classification head's, which for BERT-like families reads the first token
        alone (export/families.py decides per family)."""
        return True

    @property
    def task_config(self) -> dict[str, Any]:
        """The runtime config's task section: what CrossEncoderModel needs besides the graph."""
        num_labels = int(self.encoder.config.num_labels)
        settings = {"num_labels": num_labels, "activation_fn": self.activation_name,
                    "id2label": label_names(getattr(self.encoder.config, "id2label", None), num_labels)}
        if self.pair_template:  # pairs rendered through the model's chat template (export/pair_template.py)
            settings["pair_template"] = self.pair_template
        elif self.query_prompt:  # the CrossEncoder's default prompt, before each query
            settings["query_prompt"] = self.query_prompt
        settings.update(self.prompt_settings)
        return settings

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_token_type_ids and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        logits = self.encoder(**kwargs).logits  # (batch, num_labels)
        return logits, self.activation(logits)


def build_reranker_module(encoder: nn.Module, prepared) -> RerankerPipeline:
    """The reranker task's torch module (tasks/reranker.py names it): ``encoder``, a sequence-classification model
    (plain, merged, or a PEFT model holding adapters), with the activation the CrossEncoder's config names."""
    num_labels = int(encoder.config.num_labels)
    resolved = prepared.resolved
    activation_fn, where = configured_activation(resolved.pipeline, encoder.config, resolved.pipeline_folder,
                                                 resolved.encoder_folder)
    activation = activation_name(activation_fn, num_labels, where)
    # sentence-transformers applies the default prompt to a pair: as the system message of a chat template, or
    # before the query where the tokenizer has no chat template.
    prompt = default_prompt(prepared.resolved.pipeline)
    where = str(prepared.resolved.tokenizer_folder)
    template = chat_pair_template(prepared.tokenizer, prompt, where)
    settings = prompt_settings(prepared.tokenizer, prepared.resolved.pipeline, where)
    return RerankerPipeline(encoder, activation, prepared.uses_token_type_ids, template, prompt, settings).eval()


def prompt_settings(tokenizer, pipeline, where: str) -> dict[str, Any]:
    """What ``predict(prompt_name=..., prompt=...)`` needs at runtime (runtime/pair_prompts.py): the CrossEncoder's
    ``prompts`` and ``default_prompt_name`` as its config names them (the runtime config's top-level ``prompts``
    also hold the embedding defaults "query" and "document", which a CrossEncoder does not have), and for a chat
    template its render without a prompt and with a substitutable one."""
    settings: dict[str, Any] = {"prompts": dict(pipeline.prompts or {}),
                                "default_prompt_name": pipeline.default_prompt_name}
    if getattr(tokenizer, "chat_template", None):
        settings["unprompted_pair_template"] = unprompted_pair_template(tokenizer, where)
        slotted = prompted_pair_template(tokenizer, settings["prompts"], where)
        if slotted is not None:
            settings["prompted_pair_template"] = slotted
    return settings
