"""Who runs the model for an embed job: this process, or a pool of worker processes (one model each).

Both give ``submit(texts) -> future`` with ``.result()`` -> a ``(len(texts), dimension)`` float32 array that is
``EmbeddingModel.encode(texts, ...)`` of exactly those texts, so parts are the same whichever runs them.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, PeftExportError


@dataclass(frozen=True)
class EncodeSettings:
    """What every worker needs to open the model and encode one chunk the same way."""

    export: str
    adapter: str | None = None
    prompt_name: str | None = None
    batch_size: int = 32
    threads: int | None = None
    backend: str | None = None

    def open_model(self):
        from ..runtime.model import EmbeddingModel

        return EmbeddingModel(self.export, backend=self.backend, intra_op_threads=self.threads)

    def encode(self, model: Any, texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=self.batch_size, prompt_name=self.prompt_name,
                            adapter=self.adapter)


def check_settings(model: Any, settings: EncodeSettings) -> None:
    """Fail before the first part on an unknown adapter or prompt name, not in a worker hours later."""
    try:
        settings.encode(model, [""])
    except (ValueError, KeyError) as err:
        if isinstance(err, PeftExportError):
            raise
        raise ConfigError(str(err).strip("'\"")) from err


class _Now:
    """A finished future for work done in this process."""

    def __init__(self, value: np.ndarray):
        self._value = value

    def result(self) -> np.ndarray:
        return self._value


class InProcessEncoder:
    """The model in this process; ONNX Runtime spreads each batch over ``threads`` cores."""

    processes = 1

    def __init__(self, settings: EncodeSettings, model: Any = None):
        self.settings = settings
        self.model = model if model is not None else settings.open_model()
        check_settings(self.model, settings)

    @property
    def dimension(self) -> int:
        return self.model.get_sentence_embedding_dimension()

    def submit(self, texts: list[str]) -> _Now:
        return _Now(self.settings.encode(self.model, texts))

    def close(self) -> None:
        pass


# ----- worker processes -----
_worker: dict[str, Any] = {}


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (kill -9: no clean shutdown) exits instead of idling forever."""
    import time

    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _start_worker(settings: EncodeSettings, parent: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    _worker["settings"] = settings
    try:
        _worker["model"] = settings.open_model()
    except PeftExportError as err:  # raised by the first task, so the caller sees it, not a broken pool
        _worker["error"] = err


def _encode_in_worker(texts: list[str]) -> np.ndarray:
    return _worker["settings"].encode(_worker["model"], texts)


def _check_in_worker() -> int:
    if "error" in _worker:
        raise _worker["error"]
    check_settings(_worker["model"], _worker["settings"])
    return _worker["model"].get_sentence_embedding_dimension()


class ProcessPoolEncoder:
    """``processes`` worker processes (spawned, so no ONNX Runtime state is forked), one model each."""

    def __init__(self, settings: EncodeSettings, processes: int):
        import multiprocessing

        self.settings = settings
        self.processes = processes
        self.pool = ProcessPoolExecutor(processes, multiprocessing.get_context("spawn"), initializer=_start_worker,
                                        initargs=(settings, os.getpid()))
        # A worker checks the adapter and prompt before any part is sent (its ConfigError comes back pickled), so
        # this process never holds a model of its own.
        self.dimension = self.pool.submit(_check_in_worker).result()

    def submit(self, texts: list[str]) -> Future:
        return self.pool.submit(_encode_in_worker, texts)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
