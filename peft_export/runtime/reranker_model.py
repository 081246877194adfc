"""CrossEncoderModel: sentence-transformers' CrossEncoder.predict()/rank() on an exported reranker graph, without
torch. The graph returns the raw ``logits`` and the ``scores`` the model's own activation makes of them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, InvalidInputError
from .config import RERANKER_CONFIG_FILE
from .exported_model import ExportedModel, progress_counter

__all__ = ["ACTIVATIONS", "CrossEncoderModel"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# The activations an export may name (reranker_config.json's task_config.activation_fn), in numpy.
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sigmoid": _sigmoid,
    "identity": lambda x: x,
    "tanh": np.tanh,
}


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# What one pair may be: a list, a tuple, or a row of a numpy array of strings (sentence-transformers takes each).
_PAIR_TYPES = (list, tuple, np.ndarray)


def _pairs(inputs: Any) -> tuple[list[tuple[str, str]], bool]:
    """(pairs, single): one [query, passage] pair or a list of them, each checked to be two strings."""
    if isinstance(inputs, str) or inputs is None or not isinstance(inputs, Iterable):
        raise InvalidInputError(f"inputs must be a (query, passage) pair or a list of them, found "
                                f"{type(inputs).__name__} {inputs!r:.80}")
    if (isinstance(inputs, (list, tuple)) and len(inputs) not in (0, 2)
            and all(isinstance(x, str) for x in inputs)):
        raise InvalidInputError(f"inputs is one pair of {len(inputs)} strings, found {inputs!r:.80}: a pair is "
                                "(query, passage), two strings")
    single = (isinstance(inputs, _PAIR_TYPES) and len(inputs) == 2 and all(isinstance(x, str) for x in inputs)
              and getattr(inputs, "ndim", 1) == 1)
    items = [inputs] if single else list(inputs)
    pairs = []
    for i, pair in enumerate(items):
        if not isinstance(pair, _PAIR_TYPES) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise InvalidInputError(f"inputs[{i}] must be a (query, passage) pair of two strings, found {pair!r:.80}")
        pairs.append((str(pair[0]), str(pair[1])))  # numpy's str_ as str
    return pairs, single


class CrossEncoderModel(ExportedModel):
    """Load a reranker export folder and score (query, passage) pairs like sentence-transformers' ``CrossEncoder``.

    >>> model = CrossEncoderModel("reranker-onnx/")                       # doctest: +SKIP
    >>> model.predict([("a query", "a passage"), ("a query", "another")])  # doctest: +SKIP
    >>> model.rank("a query", ["a passage", "another"], top_k=1)          # doctest: +SKIP

    The constructor's options, the adapter methods of switchable exports and token budgeting are
    :class:`.exported_model.ExportedModel`'s; this class adds ``predict``, ``rank`` and their post-processing.
    """

    task = "reranker"
    call_name = "predict"
    runtime_config_file = RERANKER_CONFIG_FILE
    required_outputs = ("logits", "scores")

    def _check_outputs(self) -> None:
        """num_labels and the activation are the config's task section; the graph's logits are num_labels wide."""
        settings = self.config.task_config
        where = self.path / RERANKER_CONFIG_FILE
        num_labels = settings.get("num_labels")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigError(f"{where}: task_config.num_labels must be a positive integer, found {num_labels!r}; "
                              "export the folder again")
        if settings.get("activation_fn") not in ACTIVATIONS:
            raise ConfigError(f"{where}: task_config.activation_fn must be one of {', '.join(ACTIVATIONS)}, found "
                              f"{settings.get('activation_fn')!r}; export the folder again")
        labels = settings.get("id2label")  # absent in exports made before labels were recorded: LABEL_i
        if labels is not None and (not isinstance(labels, dict) or sorted(labels) != sorted(map(str, range(num_labels)))
                                   or not all(isinstance(v, str) for v in labels.values())):
            raise ConfigError(f"{where}: task_config.id2label must name each of the {num_labels} labels by its index "
                              f'("0": "a name", ...), found {labels!r:.120}; export the folder again')
        width = self.backend.output_width("logits")
        if width is not None and width != num_labels:
            raise ConfigError(f"{where}: num_labels is {num_labels} but the graph's logits have {width} values; "
                              "export the folder again")

    # ----- properties mirroring CrossEncoder -----
    @property
    def num_labels(self) -> int:
        return int(self.config.task_config["num_labels"])

    @property
    def prompts(self) -> dict[str, str]:
        """The CrossEncoder's prompts by name (empty for exports made before they were recorded)."""
        return dict(self._tokenizer.pair_prompts.prompts)

    @property
    def default_prompt_name(self) -> str | None:
        return self._tokenizer.pair_prompts.default_prompt_name

    @property
    def id2label(self) -> dict[int, str]:
        """The name of each label (logit) by its index, as a CrossEncoder's ``config.id2label``; ``LABEL_i`` for
        exports made before the names were recorded."""
        labels = self.config.task_config.get("id2label") or {}
        return {i: labels.get(str(i), f"LABEL_{i}") for i in range(self.num_labels)}

    @property
    def activation_fn(self) -> str:
        """The name of the activation the model applies to its logits by default ("sigmoid", "identity", ...)."""
        return str(self.config.task_config["activation_fn"])

    @property
    def pair_token_overhead(self) -> int:
        """Tokens a (query, passage) pair holds beyond the two texts' own: the pair's special tokens and default
        prompt, or a chat-template reranker's fixed template text (servers count a request's tokens with it)."""
        return self._tokenizer.pair_token_overhead()

    def resolve_prompt(self, prompt_name: str | None = None, prompt: str | None = None) -> str | None:
        """The prompt :meth:`predict` applies for ``prompt_name`` / ``prompt`` (None: the default prompt), checked
        without tokenizing or scoring anything: an unknown name, or a prompt this export's template cannot take,
        raises ConfigError as :meth:`predict` would. Servers check a request with it before queueing its pairs."""
        applied = self._tokenizer.pair_prompts.resolve(prompt_name, prompt)
        if applied is not None and self._tokenizer.pair_template is not None:
            self._tokenizer.pair_prompts.chat_template(applied)  # raises for a prompt the export cannot apply
        return applied

    def prompt_token_overhead(self, prompt: str | None) -> int:
        """:attr:`pair_token_overhead` with ``prompt`` (as :meth:`resolve_prompt` gives it) instead of the default."""
        return self._tokenizer.pair_token_overhead(prompt)

    def __repr__(self) -> str:
        return (f"CrossEncoderModel(path={str(self.path)!r}, backend={self.backend.name!r}, "
                f"providers={self.backend.providers}, num_labels={self.num_labels})")

    # ----- predict / rank -----
    def predict(
        self,
        inputs: Sequence[Sequence[str]] | Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: Callable[[np.ndarray], np.ndarray] | str | None = None,
        apply_softmax: bool | None = False,
        convert_to_numpy: bool = True,
        adapter: str | bool | None = None,
        max_batch_tokens: int | None | str = "auto",
    ) -> np.ndarray | list[np.ndarray] | float:
        """Scores of (query, passage) pairs: one pair gives one score (a vector of num_labels where there are
        several), a list of pairs an array of them. ``activation_fn``: None for the model's own (the graph's
        ``scores``), a name of :data:`ACTIVATIONS`, or a function of numpy logits (sentence-transformers takes torch
        modules; this class has no torch). ``apply_softmax``: a softmax over the labels of multi-label models.
        ``convert_to_numpy=False`` gives a list of per-pair arrays. ``adapter`` and ``max_batch_tokens`` are
        ``EmbeddingModel.encode``'s: pairs are tokenized once and batched by tokens, longest first, so one long
        passage does not pad a hundred short ones. ``prompt_name`` (one of :attr:`prompts`) or ``prompt`` (its
        text; "" for none): the prompt put before each query, or the system message of a chat-template reranker's
        pairs, as sentence-transformers applies it; neither: the model's default prompt (:attr:`default_prompt_name`).
        """
        if isinstance(activation_fn, str) and activation_fn in ACTIVATIONS:
            activation_fn = ACTIVATIONS[activation_fn]
        elif activation_fn is not None and (isinstance(activation_fn, str) or not callable(activation_fn)):
            found = (repr(activation_fn) if isinstance(activation_fn, str)
                     else f"{type(activation_fn).__name__} {activation_fn!r:.60}")
            raise ValueError(f"activation_fn must be a function or one of {', '.join(ACTIVATIONS)}, found {found}")
        pairs, single = _pairs(inputs)
        applied = self._tokenizer.pair_prompts.resolve(prompt_name, prompt)
        run_adapter = self._adapter_for_call(adapter)  # resolved once: every batch of this call uses it
        fetch = "scores" if activation_fn is None else "logits"
        encodings = self._tokenizer.tokenize_pairs(pairs, applied)
        batches = self._tokenizer.batches_of(encodings, batch_size, self._token_budget(max_batch_tokens))
        results: list[Any] = [None] * len(pairs)
        progress = progress_counter(show_progress_bar, len(pairs), batch_size)
        for index, _, outputs in self._run_planned(batches, [fetch], run_adapter):
            for i, row in zip(index, outputs[fetch]):
                results[i] = row
            progress(len(index))
        self._check_finite(results, adapter)
        scores = np.stack(results).astype(np.float32) if results else np.zeros((0, self.num_labels), np.float32)
        if activation_fn is not None and len(scores):
            logits_shape = scores.shape
            scores = np.asarray(activation_fn(scores), dtype=np.float32)
            # One row per pair (a value, or one per label); a reduction over the pairs is not their scores.
            if scores.ndim not in (1, 2) or scores.shape[0] != logits_shape[0]:
                raise ValueError(f"activation_fn must return one row per pair, as the logits {logits_shape} have, "
                                 f"returned shape {scores.shape}")
        if self.num_labels == 1 and scores.ndim > 1 and scores.shape[1] == 1:
            scores = scores[:, 0]  # (pairs, 1) -> (pairs,)
        if apply_softmax and scores.ndim > 1 and len(scores):
            scores = _softmax(scores)
        if single:
            return scores[0]
        return scores if convert_to_numpy else list(scores)

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: Callable[[np.ndarray], np.ndarray] | str | None = None,
        adapter: str | bool | None = None,
    ) -> list[dict[str, Any]]:
        """``documents`` ranked for ``query``, best first, in sentence-transformers' shape: ``{"corpus_id": index,
        "score": float}`` (plus ``"text"`` with ``return_documents``), the ``top_k`` best (all where None).
        ``prompt_name`` and ``prompt`` are :meth:`predict`'s."""
        if self.num_labels != 1:
            raise ValueError(f"rank() needs a model with num_labels=1; {self.path} has {self.num_labels}. Use "
                             "predict() with (query, document) pairs instead.")
        if not isinstance(query, str):
            raise InvalidInputError(f"query must be a string, found {type(query).__name__}")
        if isinstance(documents, str) or not isinstance(documents, Iterable):
            raise InvalidInputError(f"documents must be a list of strings, found {type(documents).__name__} "
                                    f"{documents!r:.60}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            # sentence-transformers slices with it: -1 would silently drop the last document
            raise ValueError(f"top_k must be None (all documents) or a non-negative integer, found {top_k!r}")
        documents = list(documents)
        for i, document in enumerate(documents):
            if not isinstance(document, str):
                raise InvalidInputError(f"documents[{i}] is {type(document).__name__}, expected str")
        scores = self.predict([(query, d) for d in documents], batch_size=batch_size,
                              show_progress_bar=show_progress_bar, activation_fn=activation_fn, adapter=adapter,
                              prompt_name=prompt_name, prompt=prompt)
        results = [{"corpus_id": i, "score": float(s)} for i, s in enumerate(np.atleast_1d(scores))]
        if return_documents:
            for result in results:
                result["text"] = documents[result["corpus_id"]]
        results.sort(key=lambda r: r["score"], reverse=True)
        return results[:top_k]
