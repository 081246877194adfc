"""EmbeddingModel: sentence-transformers' encode()/similarity() on an exported graph, without torch."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .config import RUNTIME_CONFIG_FILE
from .exported_model import CPU_MAX_BATCH_TOKENS, ExportedModel, progress_counter
from .precision import PRECISIONS, quantize_embeddings
from .similarity import normalize, similarity, similarity_pairwise

__all__ = ["CPU_MAX_BATCH_TOKENS", "OUTPUT_VALUES", "EmbeddingModel"]

OUTPUT_VALUES = ("sentence_embedding", "token_embeddings")


def _pool_numpy(tokens: np.ndarray, mask: np.ndarray, modes: list[str]) -> np.ndarray:
    """Pooling for the one case the graph cannot do: a prompt excluded from pooling (include_prompt=False)."""
    m = mask[..., None].astype(np.float32)  # (batch, seq, 1)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(tokens[np.arange(len(tokens)), mask.argmax(1)])
        elif mode == "max":
            out.append(np.where(m > 0, tokens, -np.inf).max(1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            count = np.maximum(m.sum(1), 1e-9)
            out.append((tokens * m).sum(1) / (count if mode == "mean" else np.sqrt(count)))
        elif mode == "weightedmean":
            w = m * np.arange(1, tokens.shape[1] + 1, dtype=np.float32)[None, :, None]
            out.append((tokens * w).sum(1) / np.maximum(w.sum(1), 1e-9))
        elif mode == "lasttoken":
            # The last position still in the mask (the prompt is masked at the front, so not mask.sum() - 1);
            # an all-zero row gives a zero vector, as in sentence-transformers.
            has_tokens = mask.any(1)
            last = np.where(has_tokens, mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1), 0)
            out.append(tokens[np.arange(len(tokens)), last] * has_tokens[:, None])
    return np.concatenate(out, axis=-1)


class EmbeddingModel(ExportedModel):
    """Load an export folder and embed text like ``SentenceTransformer``.

    ``backend`` is "onnxruntime", "openvino" or None (the one the folder was exported for). ``device`` is
    "cpu"/"cuda" for ONNX Runtime and "CPU"/"GPU"/"AUTO" for OpenVINO. ``intra_op_threads`` sets the threads
    of one inference on either backend; ``inference_precision`` ("f32" default, "bf16", "f16"),
    ``performance_hint`` ("LATENCY", "THROUGHPUT") and ``openvino_settings`` apply to OpenVINO only.

    >>> model = EmbeddingModel("out/")            # doctest: +SKIP
    >>> model.encode(["a query", "a passage"])    # doctest: +SKIP

    Switchable exports (``merge-onnx --switchable`` or ``merge-openvino --switchable``) add sentence-transformers'
    adapter methods (``load_adapter``, ``set_adapter``, ``active_adapters``, ``enable_adapters``,
    ``disable_adapters``, ``delete_adapter``, ``get_adapter_state_dict``) plus ``list_adapters`` and
    ``encode(..., adapter=NAME)``.

    What every exported model shares (opening and checking the folder, the backend, the tokenizer, the adapter
    methods, token budgeting) is :class:`.exported_model.ExportedModel`'s; this class adds encode() and its
    post-processing, similarity() and the sentence-transformers properties of an embedder.
    """

    task = "embedding"
    runtime_config_file = RUNTIME_CONFIG_FILE
    required_outputs = OUTPUT_VALUES

    def _check_outputs(self) -> None:
        """``dimension`` must be the graph's sentence_embedding width wherever the graph declares it."""
        width = self.backend.output_width("sentence_embedding")
        if width is not None and width != self.config.dimension:
            raise ConfigError(
                f"{self.path / RUNTIME_CONFIG_FILE}: dimension is {self.config.dimension} but the graph's "
                f"sentence_embedding has {width} values; set dimension to {width}"
            )

    # ----- properties mirroring SentenceTransformer (max_seq_length and tokenizer: ExportedModel's) -----
    @property
    def similarity_fn_name(self) -> str:
        return self.config.similarity_fn_name

    @property
    def prompts(self) -> dict[str, str]:
        return dict(self.config.prompts)

    def get_sentence_embedding_dimension(self) -> int:
        return self.config.dimension

    def __repr__(self) -> str:
        return (f"EmbeddingModel(path={str(self.path)!r}, backend={self.backend.name!r}, "
                f"providers={self.backend.providers}, dimension={self.config.dimension})")

    # ----- encode -----
    def _resolve_prompt(self, prompt_name: str | None, prompt: str | None) -> str:
        if prompt is not None:
            return prompt
        name = prompt_name if prompt_name is not None else self.config.default_prompt_name
        if name is None:
            return ""
        if name not in self.config.prompts:
            names = sorted(self.config.prompts)
            known = f"the model has prompts {names}" if names else "the model has no prompts"
            where = "prompt_name" if prompt_name is not None else "default_prompt_name in embedding_config.json"
            error = ConfigError(f"Prompt name {name!r} not found; {known} (passed as {where})")
            if prompt_name is not None:
                error.in_cli_words(f"--prompt-name {name!r} is not a prompt of {self.path}: "
                                   + (f"choose one of {', '.join(names)}" if names else "this export has no prompts"))
            raise error
        return self.config.prompts[name]

    def _postprocess(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray], output_value: str,
                     prompt_length: int) -> list[np.ndarray]:
        mask = feeds["attention_mask"]
        if output_value == "token_embeddings":
            tokens = outputs["token_embeddings"]
            return [tokens[i, : int(mask[i].sum())] for i in range(len(tokens))]
        if prompt_length and not self.config.include_prompt:
            pool_mask = mask.copy()
            pool_mask[:, :prompt_length] = 0
            emb = _pool_numpy(outputs["token_embeddings"], pool_mask, self.config.pooling_modes)
            if self.config.normalize:
                emb = normalize(emb)
            return list(emb)
        return list(outputs["sentence_embedding"])

    def encode(
        self,
        sentences: str | list[str],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: str = "sentence_embedding",
        convert_to_numpy: bool = True,
        normalize_embeddings: bool = False,
        prompt_name: str | None = None,
        prompt: str | None = None,
        truncate_dim: int | None = None,
        precision: str = "float32",
        convert_to_tensor: bool = False,
        adapter: str | list[str] | bool | None = None,
        max_batch_tokens: int | None | str = "auto",
    ) -> np.ndarray | list[np.ndarray]:
        """Embed ``sentences``; a single string gives a 1-D vector, a list gives a (n, dim) array.

        ``adapter`` (switchable exports): a loaded adapter's name to use for this call only (a list of names: those
        LoRA adapters active together, as PEFT's ``set_adapter([...])``), ``False`` for the base model for this call,
        or None (default) for the model's state (``set_adapter`` / ``disable_adapters``).
        ``max_batch_tokens`` caps a batch's padded size (inputs x longest input) on top of ``batch_size``, which
        keeps memory flat when a few long texts arrive among short ones. "auto" (default) is
        ``self.max_batch_tokens``: 1024 on CPUs, where it measured faster than plain batches of 32 (MiniLM, 1,000
        mixed sentences: 206 -> 231 sentences/s; 32-sentence requests of mixed lengths: 34 -> 186/s, with
        :func:`.batches.plan_batches` also keeping short inputs out of long batches), and no cap on GPUs. None: batches
        of ``batch_size`` only, as sentence-transformers does.
        """
        if output_value not in OUTPUT_VALUES:
            raise ValueError(f"output_value must be one of {OUTPUT_VALUES}, found {output_value!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, found {precision!r}")
        if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                         or not 0 < truncate_dim <= self.config.dimension):
            raise ValueError(f"truncate_dim must be an integer in 1..{self.config.dimension}, found {truncate_dim!r}")
        run_adapter = self._adapter_for_call(adapter)  # resolved once: every batch of this call uses it
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"sentences[{i}] is {type(text).__name__}, expected str")
        prompt_text = self._resolve_prompt(prompt_name, prompt)
        prompt_length = 0
        if prompt_text:
            texts = [prompt_text + t for t in texts]
            if not self.config.include_prompt:
                if self.config.has_dense:
                    raise ConfigError("include_prompt=False with a Dense module cannot run outside the graph")
                prompt_length = self._tokenizer.prompt_length(prompt_text)

        # Tokenize once, then batch longest first (by tokens, not characters as sentence-transformers does, so
        # each batch pads as little as possible); only the output this call needs is fetched from the graph.
        batches = self._batches(texts, batch_size, max_batch_tokens)
        pool_outside = output_value == "sentence_embedding" and bool(prompt_length) and not self.config.include_prompt
        fetch = ["token_embeddings" if output_value == "token_embeddings" or pool_outside else "sentence_embedding"]
        results: list[Any] = [None] * len(texts)
        progress = progress_counter(show_progress_bar, len(texts), batch_size)
        for index, batch_feeds, outputs in self._run_planned(batches, fetch, run_adapter):
            for i, emb in zip(index, self._postprocess(batch_feeds, outputs, output_value, prompt_length)):
                results[i] = emb
            progress(len(index))

        self._check_finite(results, adapter)
        if output_value == "token_embeddings":
            return results[0] if single else results
        dim = truncate_dim or self.config.dimension
        embeddings = np.stack(results).astype(np.float32) if results else np.zeros((0, dim), np.float32)
        if truncate_dim:
            embeddings = embeddings[:, :truncate_dim]
        if normalize_embeddings and len(embeddings):
            embeddings = normalize(embeddings)
        if precision != "float32":
            embeddings = quantize_embeddings(embeddings, precision)
        return embeddings[0] if single else embeddings

    # ----- similarity -----
    def similarity(self, embeddings1, embeddings2) -> np.ndarray:
        return similarity(embeddings1, embeddings2, self.config.similarity_fn_name)

    def similarity_pairwise(self, embeddings1, embeddings2) -> np.ndarray:
        return similarity_pairwise(embeddings1, embeddings2, self.config.similarity_fn_name)
