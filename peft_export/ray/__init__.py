"""Ray integrations: ``embed_dataset`` and ``rerank_dataset`` (Ray Data: corpus embedding and pair scoring on a
cluster) and ``serve_app`` (Ray Serve).

Needs the ``ray`` extra (``pip install 'peft_export[ray]'``). Names load lazily: importing this package imports
neither Ray nor the model runtime. The package is named ``peft_export.ray``; inside it, ``ray`` is Ray itself
(absolute imports).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["BatchEmbedder", "BatchScorer", "embed_dataset", "rerank_dataset", "serve_app"]

if TYPE_CHECKING:
    from .data import BatchEmbedder, BatchScorer, embed_dataset, rerank_dataset
    from .serve import serve_app

_HOMES = {"BatchEmbedder": "data", "BatchScorer": "data", "embed_dataset": "data", "rerank_dataset": "data",
          "serve_app": "serve"}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'peft_export.ray' has no attribute {name!r}")
