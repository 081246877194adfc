"""Embed a corpus from a file: streamed, in numbered parts, resumable after a kill (``peft-export embed``).

* :mod:`.readers` -- JSONL, CSV, Parquet and text inputs, read in fixed-size chunks with every row checked
* :mod:`.writers` -- Parquet parts, one Parquet file or ``.npy``
* :mod:`.state` -- the state file that makes a re-run continue where the last one stopped
* :mod:`.workers` -- the model in this process or in worker processes
* :mod:`.job` -- :func:`embed_corpus`, the loop that ties them together

Torch-free like the runtime; pyarrow (the ``corpus`` extra) is needed for Parquet only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["EmbedResult", "default_parallelism", "embed_corpus"]

if TYPE_CHECKING:
    from .job import EmbedResult, default_parallelism, embed_corpus


def __getattr__(name: str):
    if name in __all__:
        from . import job

        return getattr(job, name)
    raise AttributeError(f"module 'peft_export.corpus' has no attribute {name!r}")
