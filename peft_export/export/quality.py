"""Quality gate for lossy exports (int8, fp16, bf16): agreement with fp32 and retrieval retention on real text.

Retrieval retention is NDCG@10 of the lossy model divided by the fp32 model's, on a query -> passage set where
each query has exactly one relevant passage (by default the demo corpus' held-out pairs: a standard-library
docstring's first sentence as the query, the rest of it as the passage).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import ConfigError, ValidationError

Embed = Callable[[list[str]], np.ndarray]


@dataclass
class QualityGate:
    min_mean_cosine: float = 0.99
    min_worst_cosine: float = 0.97
    min_ndcg_retention: float = 0.995

    def failures(self, quality: dict[str, float]) -> list[str]:
        checks = [("mean_cosine", self.min_mean_cosine), ("worst_cosine", self.min_worst_cosine),
                  ("ndcg10_retention", self.min_ndcg_retention)]
        return [f"{key} {quality[key]:.5f} < {limit}" for key, limit in checks if not quality[key] >= limit]


# How to lower the gate: the keyword of export_onnx_model / export_openvino_model, and peft-export's flags.
LOWER_GATE = "gate=QualityGate(min_mean_cosine=..., min_worst_cosine=..., min_ndcg_retention=...)"
LOWER_GATE_CLI = "--min-mean-cosine / --min-worst-cosine / --min-ndcg-retention"

# fp16 weights lose almost nothing; their gate is never looser than this, whatever --min-mean-cosine says.
FP16_MIN_MEAN_COSINE = 0.999


# The int8 ladder both formats climb, from fastest to safest: which feed-forward projections stay in float (the
# family's names, peft_export/export/families.py). The FFN output projections, whose inputs have the widest ranges
# after the activation, are the layers that hurt most.
INT8_LADDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("per-channel, all linear layers", ()),
    ("per-channel, FFN output projections kept in fp32", ("output",)),
    ("per-channel, whole FFN kept in fp32", ("output", "input")),
)


def int8_rungs(nodes: list[str], family) -> Iterator[tuple[str, list[str]]]:
    """(strategy, nodes kept in float) for each rung of :data:`INT8_LADDER` over the weight nodes ``nodes``, by the
    family's feed-forward names; a rung that would keep the same nodes as an earlier one (a family without such
    projections) is skipped, as it would only be the same candidate again."""
    tried: set[tuple[str, ...]] = set()
    for strategy, parts in INT8_LADDER:
        excluded = [node for node in nodes if family.ffn_part(node) in parts] if parts else []
        if tuple(excluded) not in tried:
            tried.add(tuple(excluded))
            yield strategy, excluded


def fp16_gate(gate: QualityGate) -> QualityGate:
    """The gate for fp16 candidates: the user's, with the mean cosine raised to at least 0.999."""
    return replace(gate, min_mean_cosine=max(gate.min_mean_cosine, FP16_MIN_MEAN_COSINE))


def _read_lines(path: str | Path, keyword: str) -> list[str]:
    """The lines of a user's UTF-8 text file, or a ConfigError that names the file and the option that gave it
    (``keyword`` for a library caller, its flag for peft-export)."""
    flag = "--" + keyword.replace("_", "-")
    try:
        return Path(path).read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        found = f"{path} is not UTF-8 text ({err.reason} at byte {err.start});"
        raise ConfigError(f"{found} {keyword} must be a text file").in_cli_words(
            f"{found} {flag} must be a text file") from err
    except OSError as err:
        reason = err.strerror or err
        raise ConfigError(f"cannot read {keyword} {path}: {reason}").in_cli_words(
            f"cannot read {flag} {path}: {reason}") from err


def load_pairs_file(path: str | Path | None) -> list[dict[str, str]]:
    """Query/passage pairs from a JSON-lines file ({"query": ..., "passage": ...} per line); None: the demo set."""
    if path is None:
        from ..demo import load_pairs

        return load_pairs("eval")
    pairs = []
    for number, line in enumerate(_read_lines(path, "gate_data"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number} is not valid JSON: {err}") from err
        if not isinstance(item, dict) or not isinstance(item.get("query"), str) or not isinstance(
                item.get("passage"), str):
            raise ConfigError(f"{path}:{number} must be an object with string 'query' and 'passage' fields")
        pairs.append(item)
    if len(pairs) < 20:
        raise ConfigError(f"{path} holds {len(pairs)} pairs; the quality gate needs at least 20 for stable figures")
    return pairs


CALIBRATION_TEXTS_MAX = 512
CALIBRATION_PAIRS = 150  # 300 texts: NNCF's default calibration subset size


def calibration_texts(path: str | Path | None) -> list[str]:
    """Sentences for static int8 calibration: one per line of ``path`` (the first 512), or by default 300 texts
    from the demo corpus' training pairs, disjoint from the gate's held-out pairs (standard-library docstring pairs
    past the gate's 500 where the demo corpus is not installed)."""
    if path:
        texts = [line.strip() for line in _read_lines(path, "calibration_data") if line.strip()]
        if not texts:
            raise ConfigError(f"{path} holds no calibration sentences")
        return texts[:CALIBRATION_TEXTS_MAX]
    try:
        from ..demo import load_pairs

        pairs = load_pairs("train")[:CALIBRATION_PAIRS]
    except ImportError:  # no demo corpus in this installation
        # Past the 500 pairs the gate falls back to; on a standard library too short for that, overlap with the
        # gate beats no calibration.
        pairs = docstring_pairs(500 + CALIBRATION_PAIRS)[500:] or docstring_pairs(CALIBRATION_PAIRS)
    return [p["query"] for p in pairs] + [p["passage"] for p in pairs]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ndcg_at_10(queries: np.ndarray, passages: np.ndarray) -> float:
    """One relevant passage per query (same row index); cosine ranking."""
    scores = _unit(queries) @ _unit(passages).T  # (n_queries, n_passages)
    rank = (scores > scores.diagonal()[:, None]).sum(axis=1)  # 0 = first
    return float(np.where(rank < 10, 1.0 / np.log2(rank + 2), 0.0).mean())


def measure_quality(reference: Embed, candidate: Embed, pairs: list[dict[str, str]]) -> dict[str, float]:
    texts = [p["query"] for p in pairs] + [p["passage"] for p in pairs]
    return quality_against(reference(texts), candidate(texts))


def quality_against(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Gate figures of embeddings ``got`` against ``ref``, both of the gate's texts (queries, then passages)."""
    cosine = (_unit(ref) * _unit(got)).sum(axis=1)
    n = len(ref) // 2
    ndcg_ref, ndcg_got = ndcg_at_10(ref[:n], ref[n:]), ndcg_at_10(got[:n], got[n:])
    return {
        "mean_cosine": float(cosine.mean()),
        "worst_cosine": float(cosine.min()),
        "ndcg10_reference": ndcg_ref,
        "ndcg10": ndcg_got,
        "ndcg10_retention": ndcg_got / ndcg_ref if ndcg_ref > 0 else 0.0,
        "texts": len(ref),
    }


SCREEN_PAIRS = 24  # pairs (48 texts) a rung is screened on before the full gate
SCREEN_MEAN_MARGIN = 0.002  # the screen rejects on the mean only when it is this far under the gate


def screen_rows(n_pairs: int) -> np.ndarray:
    """Rows of the gate's texts (queries, then passages) the screen embeds: the first pairs, both sides."""
    k = min(SCREEN_PAIRS, n_pairs)
    return np.concatenate([np.arange(k), n_pairs + np.arange(k)])


def screen_failures(cosines: np.ndarray, gate: QualityGate) -> list[str]:
    """Why a screen's cosines already rule a candidate out: a worst cosine under the gate's is under it on the full
    set too; a mean is only an estimate, so it rejects with a margin."""
    failures = []
    if cosines.min() < gate.min_worst_cosine:
        failures.append(f"screen worst_cosine {cosines.min():.5f} < {gate.min_worst_cosine}")
    if cosines.mean() < gate.min_mean_cosine - SCREEN_MEAN_MARGIN:
        failures.append(f"screen mean_cosine {cosines.mean():.5f} < {gate.min_mean_cosine} - {SCREEN_MEAN_MARGIN}")
    return failures


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two embedding matrices."""
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def enforce(gate: QualityGate, quality: dict[str, float], what: str) -> None:
    failures = gate.failures(quality)
    if failures:
        def say(lower: str) -> str:
            return (f"{what} fails the quality gate ({'; '.join(failures)}). Nothing was written. Lower the gate "
                    f"explicitly ({lower}) if this loss is acceptable.")

        raise ValidationError(say(LOWER_GATE)).in_cli_words(say(LOWER_GATE_CLI))


def gate_dict(gate: QualityGate) -> dict[str, float]:
    return asdict(gate)


def backend_embedder(tokenizer, backend, batch_size: int = 32) -> Embed:
    """``texts -> (n, dim)`` sentence embeddings from a runtime backend, batched exactly as
    ``EmbeddingModel.encode`` batches on a CPU (by token length, longest first, under its default token budget),
    so figures measured here are the ones users reproduce: dynamic int8 picks activation scales per batch, so
    batch composition matters."""
    from ..runtime.model import CPU_MAX_BATCH_TOKENS

    def embed(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 0), np.float32)
        for index, feeds in tokenizer.batches(texts, batch_size, CPU_MAX_BATCH_TOKENS):
            emb = backend.run(feeds, ["sentence_embedding"])["sentence_embedding"]
            if out.shape[1] == 0:
                out = np.zeros((len(texts), emb.shape[1]), np.float32)
            out[index] = emb
        return out

    return embed


# Standard-library modules whose docstrings are prose; none has side effects at import.
_DOCSTRING_MODULES = (
    "argparse", "bisect", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools", "gzip", "hashlib",
    "heapq", "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox",
    "os", "pathlib", "pickle", "queue", "random", "re", "shlex", "shutil", "socket", "sqlite3", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "traceback", "unittest",
    "urllib.parse", "uuid", "warnings", "zipfile",
)
_PROSE = re.compile(r"^[A-Z][^>|{}\[\]=]*[.?!]$")


@lru_cache(maxsize=1)
def _docstring_paragraphs() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for module_name in _DOCSTRING_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a minimal Python build may lack e.g. sqlite3
            continue
        objects = [module] + [obj for name, obj in sorted(vars(module).items()) if not name.startswith("_")]
        for obj in objects:
            if inspect.isclass(obj):
                objects.extend(m for n, m in sorted(vars(obj).items()) if not n.startswith("_") and callable(m))
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or callable(obj)) else None
            for block in (doc or "").split("\n\n"):
                text = " ".join(block.split())
                # Prose only: a capital first, a sentence end last, no doctest/markup/table characters.
                if 40 <= len(text) <= 1200 and _PROSE.match(text):
                    seen.setdefault(text)
    return tuple(seen)


def docstring_pairs(n: int = 500) -> list[dict[str, str]]:
    """Query/passage pairs from the standard library's docstrings (first sentence -> the rest of the paragraph),
    for installations without the demo corpus, which is built the same way."""
    pairs, queries = [], set()
    for text in _docstring_paragraphs():
        query, _, passage = text.partition(". ")
        if len(query.split()) >= 4 and len(passage.split()) >= 8 and query not in queries:
            queries.add(query)
            pairs.append({"query": query + ".", "passage": passage})
    return pairs[:n]
