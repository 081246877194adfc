"""The model as the HTTP layer sees it: served names, token counts, and one encode call per batch group.

Anything with ``encode``, ``max_seq_length`` and ``get_sentence_embedding_dimension`` can be served. A model
that also has ``list_adapters()`` and accepts ``encode(..., adapter=NAME)`` serves each adapter under its own
name; the base model answers to ``served_model_name`` and is called without ``adapter``. Names are only ever
looked up in that in-memory list, so a name like ``../../etc/passwd`` is a 404 and never reaches the filesystem.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, NonFiniteEmbeddingError
from ..tasks import EMBEDDING, Task, task_named
from .protocol import ApiError, json_type, show
from .settings import ServeSettings
from .token_counter import TokenCounter, counter_for

# A batch group: (adapter name or None for the base, prompt name or None for the model's default prompt).
Group = tuple


# What the server sends through a model once before it declares itself ready: short and max-length inputs.
_WARMUP_TEXTS = ["warm up", "warm up the model with a longer sentence " * 64]


def served_task(model: Any) -> Task:
    """The task ``model`` runs: its class's ``task`` (every ``ExportedModel``); other objects with an
    EmbeddingModel's methods (wrappers, test doubles) are served as embedders."""
    name = getattr(model, "task", None)
    return task_named(name if isinstance(name, str) else EMBEDDING.name)


class ServedModel:
    def __init__(self, model: Any, settings: ServeSettings):
        self.task = served_task(model)
        for needed in self.task.served_attributes:
            if not hasattr(model, needed):
                like = "EmbeddingModel" if self.task is EMBEDDING else self.task.runtime_class.rsplit(":", 1)[-1]
                raise ConfigError(f"create_app needs an {like}-like object; {type(model).__name__} has no "
                                  f"{needed!r}")
        self.model = model
        self._batch_call = getattr(model, self.task.batch_call)
        self.base_name = settings.served_model_name or Path(str(getattr(model, "path", "model"))).name
        self.adapters = [str(name) for name in getattr(model, "list_adapters", lambda: [])()]
        if self.base_name in self.adapters:
            raise ConfigError(f"The served model name {self.base_name!r} is also an adapter's name; pick another "
                              "with --served-model-name")
        self.names = [self.base_name, *self.adapters]
        dimension = getattr(model, "get_sentence_embedding_dimension", None)  # embedders only
        self.dimension = int(dimension()) if dimension is not None else 0
        self.max_tokens = int(model.max_seq_length)
        self.model_batch_size = settings.model_batch_size
        self.prompts: dict[str, str] = dict(getattr(model, "prompts", None) or {})
        self.default_prompt_name = getattr(getattr(model, "config", None), "default_prompt_name", None)
        self.similarity_fn_name = getattr(model, "similarity_fn_name", "cosine")
        self._counter = counter_for(model, self.max_tokens)
        if self._counter is None:
            raise ConfigError(f"{type(model).__name__} has neither count_tokens() nor a `tokenizers` tokenizer; the "
                              "server needs one to enforce token limits")
        self.default_adapter: str | None = None
        if settings.default_adapter is not None:
            if settings.default_adapter not in self.names:
                raise ConfigError(f"--default-adapter {settings.default_adapter!r} is not served; the model has "
                                  f"{', '.join(map(repr, self.names))}")
            self.default_adapter = self.adapter_for(settings.default_adapter)
        self.merged_budget = None
        if settings.merged_adapter_budget and not self.adapters:
            raise ConfigError(f"--merged-adapter-budget {settings.merged_adapter_budget} needs a switchable export "
                              f"with adapters; {self.base_name} has none to merge")
        if settings.merged_adapter_budget:
            from .merged_budget import MergedAdapterBudget

            self.merged_budget = MergedAdapterBudget(model, settings.merged_adapter_budget)

    def close(self) -> None:
        """Stop the merged-adapter budget's background merges (the server's shutdown)."""
        if self.merged_budget is not None:
            self.merged_budget.close()

    # ----- names -----
    def adapter_for(self, name: Any, field: str = "model") -> str | None:
        """The adapter to pass to encode for a ``model`` field (None: the base); 404 for any other name."""
        if not isinstance(name, str):
            raise ApiError(422, "invalid_type", f"Field {field!r} must be a string, found {json_type(name)}",
                           param=field)
        if name == self.base_name:
            return None
        if name in self.adapters:
            return name
        raise ApiError(404, "model_not_found",
                       f"Model {show(name)} is not served here; available: {', '.join(self.names)}", param=field)

    def label(self, adapter: str | None) -> str:
        return self.base_name if adapter is None else adapter

    # ----- prompts and tokens -----
    def prompt_text(self, prompt_name: str | None, field: str = "prompt_name") -> str:
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            raise ApiError(422, "unknown_prompt",
                           f"Prompt {show(name)} is not defined by the model; it has {sorted(self.prompts)}",
                           param=field)
        return self.prompts[name]

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text becomes, special tokens included and without truncation."""
        if isinstance(self._counter, TokenCounter):
            return self._counter.count(texts)
        return self._counter(texts)

    def measure(self, texts: list[str], prompt: str) -> tuple[list[str], list[int]]:
        """Per text, what to embed and its token count with the prompt (TokenCounter.measure: a long text may
        come back as a prefix that embeds the same under truncation, counted as ``max_tokens + 1``)."""
        if isinstance(self._counter, TokenCounter):
            return self._counter.measure(texts, prompt)
        return list(texts), self._counter([prompt + t for t in texts] if prompt else list(texts))

    @property
    def warmup_inputs(self) -> list:
        """Inputs of the task's batch call for the warm-up: texts, or (text, text) pairs."""
        return [(t, t) for t in _WARMUP_TEXTS] if self.task.text_pairs else list(_WARMUP_TEXTS)

    def pair_prompt(self, prompt_name: str | None, prompt: str | None, max_chars: int) -> str | None:
        """The reranker prompt a request asks for with ``prompt_name`` (one of the model's prompts) or ``prompt``
        (its text; "" for none), as ``CrossEncoderModel.predict`` takes them; None (neither): the model's default.
        422 for both at once, an unknown name, a prompt over ``max_chars`` characters (an input's limit), or a
        prompt this export cannot apply."""
        if prompt_name is None and prompt is None:
            return None
        if prompt is not None and len(prompt) > max_chars:
            raise ApiError(422, "input_too_long", f"Field 'prompt' has {len(prompt)} characters; the limit is "
                           f"{max_chars}", param="prompt")
        if prompt_name is not None and prompt is not None:
            raise ApiError(422, "prompt_conflict", "Send either 'prompt_name' or 'prompt', not both",
                           param="prompt")
        field = "prompt_name" if prompt is None else "prompt"
        resolve = getattr(self.model, "resolve_prompt", None)
        if resolve is None:
            raise ApiError(422, "unknown_prompt", f"Model {self.base_name!r} takes no prompts", param=field)
        try:
            return resolve(prompt_name, prompt)
        except ConfigError as err:
            # The runtime names the export by its folder; a client gets the served name, never a server path.
            folder = str(getattr(self.model, "path", "")) or None
            message = str(err).replace(folder, f"Model {self.base_name!r}") if folder else str(err)
            raise ApiError(422, "unknown_prompt" if prompt is None else "invalid_prompt", message,
                           param=field) from None

    def measure_pairs(self, query: str, documents: list[str], prompt: str | None = None
                      ) -> tuple[str, list[str], list[int]]:
        """What to score of ``query`` and each document (long ones as their prefixes, :meth:`measure`) and the
        tokens of each (query, document) pair before truncation, with what the model adds to a pair with
        ``prompt`` (:meth:`pair_prompt`; None: the default): special tokens and prompt, or a chat template's
        text."""
        (query,), (query_tokens,) = self.measure([query], "")
        documents, document_tokens = self.measure(documents, "")
        return query, documents, self._pair_tokens([query_tokens] * len(documents), document_tokens, prompt)

    def measure_text_pairs(self, firsts: list[str], seconds: list[str], prompt: str | None = None
                           ) -> tuple[list[str], list[str], list[int]]:
        """:meth:`measure_pairs` for pairs that share no text: (first, second) pairs of TEI's ``/predict``."""
        firsts, first_tokens = self.measure(firsts, "")
        seconds, second_tokens = self.measure(seconds, "")
        return firsts, seconds, self._pair_tokens(first_tokens, second_tokens, prompt)

    def _pair_tokens(self, first_tokens: list[int], second_tokens: list[int], prompt: str | None) -> list[int]:
        """Tokens of pairs of texts measured alone: measure() counts each text with its special tokens, a pair has
        the model's own with ``prompt`` (``pair_token_overhead``) instead."""
        alone = 2 * self._special_tokens(False)
        overhead = (self.model.pair_token_overhead if prompt is None
                    else self.model.prompt_token_overhead(prompt))
        return [a + b - alone + overhead for a, b in zip(first_tokens, second_tokens)]

    def _special_tokens(self, is_pair: bool) -> int:
        tokenizer = getattr(self.model, "tokenizer", None)
        return int(tokenizer.num_special_tokens_to_add(is_pair)) if tokenizer is not None else 0

    # ----- the model call (runs on the model thread) -----
    def encode_group(self, group: Hashable, texts: list) -> np.ndarray:
        """Run the task's batch call (``encode``, ``predict``) on the inputs of one batch group ``(adapter,
        option)``; ``option`` becomes the call's options as the task says (``Task.batch_options``)."""
        adapter, option = group
        options: dict[str, Any] = {"batch_size": self.model_batch_size, **self.task.batch_options(option)}
        if adapter is not None:
            options["adapter"] = adapter
            if self.merged_budget is not None:
                self.merged_budget.touch(adapter)
        elif self.adapters:
            options["adapter"] = False  # the base itself, even when the export activates a default adapter
        try:
            # One row per input, as the batcher stores them: a reranker's scores (n,) become (n, 1).
            vectors = np.asarray(self._batch_call(texts, **options), dtype=np.float32).reshape(len(texts), -1)
        except NonFiniteEmbeddingError as err:
            raise self._non_finite(adapter) from err
        if not np.isfinite(vectors).all():  # any model object: NaN/Inf is never served as an embedding
            raise self._non_finite(adapter)
        return vectors

    def _non_finite(self, adapter: str | None) -> ApiError:
        what = "scores" if self.task.text_pairs else "embeddings"
        return ApiError(500, "non_finite_embedding",
                        f"Model {self.label(adapter)!r} produced NaN or Inf for this batch (corrupt weights?); "
                        f"no {what} were returned")
