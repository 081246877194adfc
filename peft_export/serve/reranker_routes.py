"""The reranker task's routes: not built yet. Serving a reranker (TEI ``POST /rerank``, Cohere/Jina ``POST
/v1/rerank``) needs the served model's batch call to become the task's (serve/served_model.py's is ``encode``);
until then a reranker export is refused here, when the app is made, with one clear message, instead of being
served on embedding routes it cannot answer. See docs/rerankers-status.md."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError


def reranker_routes(server: Any) -> list[Any]:
    """Refuse to serve a reranker: see the module docstring."""
    raise ConfigError(
        f"Serving reranker exports is not supported yet ({getattr(server.model, 'path', 'this model')} is a "
        "reranker export); score pairs in Python with peft_export.load(path).predict(pairs) / .rank(query, "
        "documents) meanwhile.").in_cli_words(
        "peft-export serve cannot serve a reranker export yet; use peft_export.load(PATH).rank(...) in Python")
