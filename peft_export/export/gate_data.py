"""The texts lossy exports are gated and calibrated on: a query/passage pairs file (default: the demo corpus'
held-out pairs), calibration sentences (default: the demo's training text), and pairs cut from the standard
library's docstrings (real prose that ships with every Python)."""

from __future__ import annotations

import importlib
import inspect
import json
import re
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError

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
