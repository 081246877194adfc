"""EmbeddingModel: sentence-transformers' encode()/similarity() on an exported graph, without torch."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, NonFiniteEmbeddingError
from .adapters import AdapterMethods
from .backends import open_backend
from .config import RUNTIME_CONFIG_FILE, TOKENIZER_FILE, RuntimeConfig, check_export_folder, read_manifest
from .export_files import graph_files, verify_export_files
from .onnxruntime_backend import SessionSettings
from .precision import PRECISIONS, quantize_embeddings
from .similarity import normalize, similarity, similarity_pairwise
from .tokenizer import TextTokenizer

OUTPUT_VALUES = ("sentence_embedding", "token_embeddings")
CPU_MAX_BATCH_TOKENS = 1024


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


class EmbeddingModel(AdapterMethods):
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
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        providers: list | None = None,
        *,
        backend: str | None = None,
        intra_op_threads: int | None = None,
        session_settings: SessionSettings | None = None,
        openvino_settings: Any = None,
        inference_precision: str | None = None,
        performance_hint: str | None = None,
    ):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConfigError(f"Export folder not found: {self.path}")
        check_export_folder(self.path)
        self.manifest = read_manifest(self.path)
        self.config = RuntimeConfig.load(self.path, self.manifest)
        self._check_sequence_limit()
        self.device = device
        self.backend = open_backend(
            self.path, self.config, backend, device, providers=providers, intra_op_threads=intra_op_threads,
            session_settings=session_settings, openvino_settings=openvino_settings,
            inference_precision=inference_precision, performance_hint=performance_hint,
        )
        # Every file is the one the manifest recorded (checked after the backend's own checks, whose errors say more
        # about a missing or truncated graph file).
        verify_export_files(self.path, self.manifest,
                            [RUNTIME_CONFIG_FILE, TOKENIZER_FILE, *graph_files(self.config.model_file)])
        self._tokenizer = TextTokenizer(self.path, self.config, self.manifest)
        # Graph inputs are what the tokenizer feeds; anything else means the folder was tampered with.
        missing = set(self.backend.input_names) - {"input_ids", "attention_mask", "token_type_ids"}
        if missing:
            raise ConfigError(f"{self.path}: graph has inputs {sorted(missing)} that the tokenizer cannot provide")
        absent = set(OUTPUT_VALUES) - set(self.backend.output_names)
        if absent:
            raise ConfigError(f"{self.path}: graph lacks outputs {sorted(absent)}; export the folder again")
        self._tokenizer.input_names = self.backend.input_names
        self._check_output_width()
        # Padded tokens per run for encode(max_batch_tokens="auto"): small runs keep attention in cache on CPUs.
        on_gpu = str(device).lower() == "cuda" or str(device).upper().startswith("GPU")
        self.max_batch_tokens: int | None = None if on_gpu else CPU_MAX_BATCH_TOKENS
        self._init_adapters()

    def _check_sequence_limit(self) -> None:
        """max_seq_length within what the graph takes: its positions (recorded at export), or for exports made
        before that was recorded, the length the export was validated with."""
        if self.config.max_positions is not None:
            return  # checked against max_positions when the config was read
        exported = (self.manifest.get("pipeline") or {}).get("max_seq_length")
        if isinstance(exported, int) and self.config.max_seq_length > exported:
            raise ConfigError(
                f"{self.path / RUNTIME_CONFIG_FILE}: max_seq_length {self.config.max_seq_length} exceeds the "
                f"{exported} tokens this graph was exported and validated with; set it to at most {exported}"
            )

    def _check_output_width(self) -> None:
        """``dimension`` must be the graph's sentence_embedding width wherever the graph declares it."""
        width = getattr(self.backend, "output_width", lambda name: None)("sentence_embedding")
        if width is not None and width != self.config.dimension:
            raise ConfigError(
                f"{self.path / RUNTIME_CONFIG_FILE}: dimension is {self.config.dimension} but the graph's "
                f"sentence_embedding has {width} values; set dimension to {width}"
            )

    def _check_finite(self, vectors: list[np.ndarray], adapter: str | bool | None) -> None:
        """Refuse NaN/Inf instead of returning them as embeddings (corrupt weights, an overflowing adapter)."""
        bad = [i for i, v in enumerate(vectors) if not np.isfinite(v).all()]
        if not bad:
            return
        if adapter is None:
            with self._adapter_lock:
                adapter = self._active_adapter if self._adapters_enabled else None
        which = "the base model" if adapter in (None, False) else f"adapter {adapter!r}"
        raise NonFiniteEmbeddingError(
            f"{self.path} with {which} produced NaN or Inf for {len(bad)} of {len(vectors)} inputs (first: index "
            f"{bad[0]}); its weights may be corrupt. Nothing was returned."
        )

    # ----- properties mirroring SentenceTransformer -----
    @property
    def max_seq_length(self) -> int:
        return self.config.max_seq_length

    @property
    def similarity_fn_name(self) -> str:
        return self.config.similarity_fn_name

    @property
    def tokenizer(self):
        """The underlying ``tokenizers.Tokenizer`` (truncation set to max_seq_length)."""
        return self._tokenizer.tokenizer

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

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self._tokenizer.encode(list(texts))

    def _run_batches(self, batches: list[dict[str, np.ndarray]], outputs: list[str], adapter=None
                     ) -> list[dict[str, np.ndarray]]:
        """One backend run per batch; several at once where the backend runs requests in parallel (OpenVINO
        THROUGHPUT hint)."""
        options = {} if adapter is None else {"adapter": adapter}
        if len(batches) > 1 and hasattr(self.backend, "run_batches"):
            return self.backend.run_batches(batches, outputs, **options)
        return [self.backend.run(feeds, outputs, **options) for feeds in batches]

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
        adapter: str | bool | None = None,
        max_batch_tokens: int | None | str = "auto",
    ) -> np.ndarray | list[np.ndarray]:
        """Embed ``sentences``; a single string gives a 1-D vector, a list gives a (n, dim) array.

        ``adapter`` (switchable exports): a loaded adapter's name to use for this call only, ``False`` for the
        base model for this call, or None (default) for the model's state (``set_adapter`` / ``disable_adapters``).
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
        if max_batch_tokens == "auto":
            max_batch_tokens = self.max_batch_tokens
        batches = self._tokenizer.batches(texts, batch_size, max_batch_tokens)
        pool_outside = output_value == "sentence_embedding" and bool(prompt_length) and not self.config.include_prompt
        fetch = ["token_embeddings" if output_value == "token_embeddings" or pool_outside else "sentence_embedding"]
        results: list[Any] = [None] * len(texts)
        progress = _progress(show_progress_bar, len(texts), batch_size)
        at_once = max(1, int(getattr(self.backend, "parallel_requests", 1)))
        while group := list(islice(batches, at_once)):
            indices, feeds = zip(*group)
            for index, batch_feeds, outputs in zip(indices, feeds, self._run_batches(list(feeds), fetch, run_adapter)):
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

    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "backend": self.backend.name, "providers": self.backend.providers,
                "runtime": self.backend.describe(), "config": self.config.to_dict(), "manifest": self.manifest}


def _progress(show: bool | None, total: int, batch_size: int):
    if not show or total <= batch_size:
        return lambda n: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return lambda n: None
    bar = tqdm(total=total, desc="Batches", unit="sentence")

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return update
