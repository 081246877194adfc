"""HTTP serving of an EmbeddingModel: OpenAI and text-embeddings-inference routes, dynamic batching, limits.

Needs the ``serve`` extra (``pip install 'peft_export[serve]'``). Names are imported lazily so that importing
this package does not import Starlette or uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "run_server"]

if TYPE_CHECKING:
    from .app import create_app
    from .server import run_server


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "run_server":
        from .server import run_server

        return run_server
    raise AttributeError(f"module 'peft_export.serve' has no attribute {name!r}")
