"""ExportedModel: what every exported model class shares, whatever its task (embedding, later reranking).

Opening an export: the folder and manifest checks, the task check (the class must be the one for the task the
manifest names), the runtime config, the backend (:class:`.backends.Backend`), every file verified against the
manifest, the tokenizer, and the adapter methods of switchable exports (:class:`.adapters.AdapterMethods`).
Running one: inputs tokenized once and batched by token length under a token budget (``max_batch_tokens``), the
batches run on the backend, several at once where it runs requests in parallel, and NaN/Inf refused.
A task's class (``EmbeddingModel``) adds its own call (``encode``), the outputs it needs from the graph
(``required_outputs``) and its output checks (``_check_outputs``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, NonFiniteEmbeddingError
from .adapters import AdapterMethods
from .backends import Backend, Feeds, open_backend
from .config import (
    MANIFEST_FILE,
    RUNTIME_CONFIG_FILE,
    TOKENIZER_FILE,
    RuntimeConfig,
    check_export_folder,
    folder_not_found,
    read_manifest,
)
from .export_files import changed_file_error, graph_files, verify_export_files
from .onnxruntime_backend import SessionSettings
from .tokenizer import TextTokenizer

CPU_MAX_BATCH_TOKENS = 1024
# The task of an export whose manifest names none (every export made before tasks were recorded).
DEFAULT_TASK = "embedding"
TOKENIZER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# One planned batch: the indices of its inputs in the call, and the graph's inputs for them.
Batch = tuple[np.ndarray, Feeds]


def task_of(manifest: dict[str, Any], folder: Path) -> str:
    """The task ``manifest`` records (exports without one are embedding exports)."""
    task = manifest.get("task", DEFAULT_TASK)
    if not isinstance(task, str):
        raise ConfigError(f"{folder / MANIFEST_FILE}: task must be a string such as {DEFAULT_TASK!r}, found {task!r}; "
                          "the manifest was edited or corrupted. Export the folder again.")
    return task


class ExportedModel(AdapterMethods):
    """Base of the classes that open an export folder; a subclass runs one task (``task``, as the manifest records
    it) and is refused exports of any other. ``peft_export.load(path)`` picks the class from the manifest.

    The constructor's options are every class's: ``backend`` ("onnxruntime", "openvino" or None for the one the
    folder was exported for), ``device`` ("cpu"/"cuda" for ONNX Runtime, "CPU"/"GPU"/"AUTO" for OpenVINO),
    ``intra_op_threads`` (threads of one inference on either backend), ``providers`` and ``session_settings``
    (ONNX Runtime), ``openvino_settings``, ``inference_precision`` and ``performance_hint`` (OpenVINO).
    """

    task: ClassVar[str | None] = None  # the manifest "task" this class runs; None: the base, which runs none
    runtime_config_file: ClassVar[str] = RUNTIME_CONFIG_FILE  # the task's runtime config section in the folder
    required_outputs: ClassVar[tuple[str, ...]] = ()  # graph outputs the class needs (checked at load)

    backend: Backend

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
            raise folder_not_found(self.path)
        self._refuse_other_task_early()
        check_export_folder(self.path, self.runtime_config_file)
        self.manifest = read_manifest(self.path)
        self._check_task(self.manifest)
        self.config = RuntimeConfig.load(self.path, self.manifest, self.runtime_config_file)
        self._check_sequence_limit()
        self.device = device
        try:
            self.backend = open_backend(
                self.path, self.config, backend, device, providers=providers, intra_op_threads=intra_op_threads,
                session_settings=session_settings, openvino_settings=openvino_settings,
                inference_precision=inference_precision, performance_hint=performance_hint,
            )
        except ConfigError as err:  # a graph edited so that the backend cannot read it: say it was changed
            changed = changed_file_error(self.path, self.manifest, graph_files(self.config.model_file), err)
            if changed is None:
                raise
            raise changed from err
        # Every file is the one the manifest recorded (checked after the backend's own checks, whose errors say more
        # about a missing or truncated graph file).
        verify_export_files(self.path, self.manifest,
                            [self.runtime_config_file, TOKENIZER_FILE, *graph_files(self.config.model_file)])
        self._tokenizer = TextTokenizer(self.path, self.config, self.manifest)
        # Graph inputs are what the tokenizer feeds; anything else means the folder was tampered with.
        missing = set(self.backend.input_names) - set(TOKENIZER_INPUTS)
        if missing:
            raise ConfigError(f"{self.path}: graph has inputs {sorted(missing)} that the tokenizer cannot provide")
        absent = set(self.required_outputs) - set(self.backend.output_names)
        if absent:
            raise ConfigError(f"{self.path}: graph lacks outputs {sorted(absent)}; export the folder again")
        self._tokenizer.input_names = self.backend.input_names
        self._check_outputs()
        # Padded tokens per run for max_batch_tokens="auto": small runs keep attention in cache on CPUs.
        on_gpu = str(device).lower() == "cuda" or str(device).upper().startswith("GPU")
        self.max_batch_tokens: int | None = None if on_gpu else CPU_MAX_BATCH_TOKENS
        self._init_adapters()

    # ----- opening -----
    def _refuse_other_task_early(self) -> None:
        """Another task's export may have no ``runtime_config_file`` of this class: name the class it needs rather
        than call it "not an export folder" (a manifest that cannot be read is left to the checks that follow)."""
        if (self.path / self.runtime_config_file).is_file() or not (self.path / MANIFEST_FILE).is_file():
            return
        try:
            manifest = read_manifest(self.path)
        except ConfigError:
            return
        self._check_task(manifest)
        # The manifest names this class's task, yet the folder holds another task's runtime config: the manifest's
        # task was edited (or removed), or files of two exports were mixed. Say so rather than "not an export".
        named = (f"names the task {manifest['task']!r}" if "task" in manifest else
                 f"names no task (so the {DEFAULT_TASK!r} task)")
        for other in _runtime_classes():
            found = self.path / other.runtime_config_file
            if other.runtime_config_file != self.runtime_config_file and found.is_file():
                raise ConfigError(
                    f"{self.path / MANIFEST_FILE} {named}, but the folder "
                    f"holds {other.runtime_config_file} (the {other.task!r} task's runtime config) and no "
                    f"{self.runtime_config_file}: the manifest was edited or the folder mixes two exports; refused. "
                    "Export the folder again."
                )

    def _check_task(self, manifest: dict[str, Any]) -> None:
        """Refuse an export made for another task, naming the class that opens it."""
        found = task_of(manifest, self.path)
        if found == type(self).task:
            return
        cls = type(self).__name__
        if type(self).task is None:
            raise ConfigError(f"{cls} runs no task; open {self.path} with peft_export.load(path), which picks the "
                              f"class of its task ({found!r})")
        right = runtime_class_for(found)
        what = (f"{self.path} is an export of the {found!r} task (its {MANIFEST_FILE} says so); {cls} opens "
                f"{type(self).task!r} exports")
        if right is None:
            raise ConfigError(f"{what}, and this version of peft_export has no class for {found!r} exports. Upgrade "
                              "peft_export to open it.")
        raise ConfigError(f"{what}. Open it with {right.__name__} (from {right.__module__}), or with "
                          "peft_export.load(path), which picks the class of its task.")

    def _check_sequence_limit(self) -> None:
        """max_seq_length within what the graph takes: its positions (recorded at export), or for exports made
        before that was recorded, the length the export was validated with."""
        if self.config.max_positions is not None:
            return  # checked against max_positions when the config was read
        exported = (self.manifest.get("pipeline") or {}).get("max_seq_length")
        if isinstance(exported, int) and self.config.max_seq_length > exported:
            raise ConfigError(
                f"{self.path / self.runtime_config_file}: max_seq_length {self.config.max_seq_length} exceeds the "
                f"{exported} tokens this graph was exported and validated with; set it to at most {exported}"
            )

    def _check_outputs(self) -> None:
        """The task's checks of the graph's outputs (their widths against the runtime config), after
        ``required_outputs`` are known to be there."""

    # ----- running -----
    def _check_finite(self, vectors: list[np.ndarray], adapter: str | bool | None) -> None:
        """Refuse NaN/Inf instead of returning them as results (corrupt weights, an overflowing adapter)."""
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

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self._tokenizer.encode(list(texts))

    def _batches(self, texts: list[str], batch_size: int, max_batch_tokens: int | None | str) -> Iterator[Batch]:
        """``texts`` tokenized once and batched longest first (by tokens, so each batch pads as little as possible),
        each batch capped at ``batch_size`` inputs and ``max_batch_tokens`` padded tokens ("auto":
        ``self.max_batch_tokens``; None: no cap). See :func:`.batches.plan_batches`; inputs tokenized otherwise
        (text pairs) are batched the same way by ``self._tokenizer.batches_of`` with :meth:`_token_budget`."""
        return self._tokenizer.batches(texts, batch_size, self._token_budget(max_batch_tokens))

    def _token_budget(self, max_batch_tokens: int | None | str) -> int | None:
        """The padded tokens per batch a call asked for: "auto" is ``self.max_batch_tokens``."""
        return self.max_batch_tokens if max_batch_tokens == "auto" else max_batch_tokens

    def _run_planned(self, batches: Iterable[Batch], outputs: list[str], adapter: Any = None
                     ) -> Iterator[tuple[np.ndarray, Feeds, dict[str, np.ndarray]]]:
        """``(indices, inputs, graph outputs)`` per batch, in order; ``parallel_requests`` batches are taken at a
        time so a backend that runs requests in parallel (OpenVINO THROUGHPUT hint) gets them together.
        ``adapter`` is the backend handle every batch runs with (:meth:`_adapter_for_call`)."""
        batches = iter(batches)
        at_once = max(1, int(self.backend.parallel_requests))
        while group := list(islice(batches, at_once)):
            indices, feeds = zip(*group)
            yield from zip(indices, feeds, self._run_batches(list(feeds), outputs, adapter))

    def _run_batches(self, batches: list[Feeds], outputs: list[str], adapter: Any = None
                     ) -> list[dict[str, np.ndarray]]:
        """One backend run per batch; several at once where the backend runs requests in parallel."""
        if len(batches) > 1:
            return self.backend.run_batches(batches, outputs, adapter=adapter)
        return [self.backend.run(feeds, outputs, adapter=adapter) for feeds in batches]

    # ----- properties mirroring sentence-transformers -----
    @property
    def max_seq_length(self) -> int:
        return self.config.max_seq_length

    @property
    def tokenizer(self):
        """The underlying ``tokenizers.Tokenizer`` (truncation set to max_seq_length)."""
        return self._tokenizer.tokenizer

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={str(self.path)!r}, backend={self.backend.name!r}, "
                f"providers={self.backend.providers})")

    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "backend": self.backend.name, "providers": self.backend.providers,
                "runtime": self.backend.describe(), "config": self.config.to_dict(), "manifest": self.manifest}


def runtime_class_for(task: str) -> type[ExportedModel] | None:
    """The class that opens exports of ``task``: the subclass of ExportedModel that declares it (every runtime
    class is imported with ``peft_export.runtime``)."""
    return next((cls for cls in _runtime_classes() if cls.task == task), None)


def _runtime_classes() -> Iterator[type[ExportedModel]]:
    """Every subclass of ExportedModel that runs a task (every runtime class is imported with
    ``peft_export.runtime``)."""
    pending = list(ExportedModel.__subclasses__())
    while pending:
        cls = pending.pop(0)
        if cls.task is not None:
            yield cls
        pending.extend(cls.__subclasses__())


def progress_counter(show: bool | None, total: int, batch_size: int) -> Callable[[int], None]:
    """A callback counting inputs done on a tqdm bar when ``show`` and there is more than one batch (a no-op
    otherwise, or without tqdm)."""
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
