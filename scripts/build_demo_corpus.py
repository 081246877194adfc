#!/usr/bin/env python
"""Build the demo retrieval corpus from the Python standard library's docstrings.

Every public module, class, function and method of the standard library that has a
docstring with a summary sentence and a body gives one (query, passage) pair:

* query   = the first sentence of the docstring (4..40 words),
* passage = the rest of the docstring, whitespace-normalised (15..200 words).

The standard library alone yields about 1,900 such pairs, so prose paragraphs of the Python
Language Reference that ships with pydoc (``pydoc_data.topics``, what ``help("topic")``
shows) are added the same way: first sentence of the paragraph vs the rest of it.

The result is real English technical text available offline, which is what the demo
LoRA adapter (``scripts/train_demo_adapter.py``) is trained and evaluated on, and what
tests and benchmarks use as sample sentences (``peft_export.demo.load_sentences``).

The output is deterministic for a given Python version: modules are imported in sorted
order, members are visited in sorted order, pairs are deduplicated, sorted and then
shuffled with a fixed seed.

Usage::

    python scripts/build_demo_corpus.py            # writes peft_export/demo/corpus.jsonl
    python scripts/build_demo_corpus.py -o x.jsonl --max-pairs 5000
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import random
import re
import sys
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "peft_export" / "demo" / "corpus.jsonl"

SEED = 20240611
MIN_QUERY_WORDS, MAX_QUERY_WORDS = 4, 40
MIN_PASSAGE_WORDS, MAX_PASSAGE_WORDS = 15, 200

# Top-level modules that are GUI toolkits, test suites, have side effects at import
# time (opening a browser, printing), or are just noise for a retrieval corpus.
SKIP_TOP_LEVEL = {
    "antigravity",  # opens a web browser
    "this",  # prints the Zen of Python
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "lib2to3",  # deprecated, test data and grammar pickles
    "distutils",  # deprecated, duplicated by setuptools
    "pydoc_data",  # no docstrings; its reference text is read by iter_reference_pairs()
    "encodings",  # hundreds of boilerplate codec modules
    "msilib",
    "winreg",
    "winsound",
    "msvcrt",
    "nt",
}
# Any dotted-name component in this set excludes the module (e.g. ctypes.test).
SKIP_COMPONENTS = {"test", "tests", "idle_test", "__main__"}

_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "resp.", "Mr.", "Dr.", "No.")
_SIGNATURE_RE = re.compile(r"^[A-Za-z_][\w.]*\s*\(.*\)\s*(->.*)?$")
_WS_RE = re.compile(r"\s+")


def iter_stdlib_module_names() -> list[str]:
    """Public stdlib module names, including submodules of packages, sorted."""
    names: set[str] = set()
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP_TOP_LEVEL:
            continue
        names.add(top)
        module = safe_import(top)
        if module is None or not hasattr(module, "__path__"):
            continue
        try:
            walker = list(pkgutil.walk_packages(module.__path__, prefix=top + ".", onerror=lambda _name: None))
        except Exception:  # noqa: BLE001 - walking may import packages; be defensive
            continue
        for info in walker:
            parts = info.name.split(".")
            if any(p.startswith("_") or p in SKIP_COMPONENTS for p in parts):
                continue
            names.add(info.name)
    return sorted(names)


def safe_import(name: str):
    """Import a module, swallowing every failure and anything it prints."""
    parts = name.split(".")
    if parts[0] in SKIP_TOP_LEVEL or any(p in SKIP_COMPONENTS for p in parts):
        return None
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - ImportError, SystemExit, OSError, ... all mean "skip"
        return None


_DOCUMENTED_DUNDERS = {"__init__", "__new__", "__call__"}


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def _defined_here(obj, modname: str) -> bool:
    """True if obj belongs to module modname (or to a private implementation module of it).

    Re-exports from other public modules are skipped so they are not counted twice; objects
    whose ``__module__`` is private (``_io``, ``_socket``, ...) are documented under the public
    module that exposes them.
    """
    owner = getattr(obj, "__module__", None)
    if owner is None or owner == modname:
        return True
    return isinstance(owner, str) and any(part.startswith("_") for part in owner.split("."))


def iter_documented_objects(module) -> list[tuple[str, str]]:
    """(source, docstring) for the module and its own public classes, functions and methods."""
    modname = module.__name__
    out: list[tuple[str, str]] = []
    doc = inspect.getdoc(module) if isinstance(getattr(module, "__doc__", None), str) else None
    if doc:
        out.append((modname, doc))
    try:
        member_names = sorted(vars(module))
    except TypeError:
        return out
    for name in member_names:
        if not _is_public(name):
            continue
        obj = vars(module)[name]
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        # Only objects defined in this module, so re-exports are not counted twice.
        if not _defined_here(obj, modname):
            continue
        own = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        if own:
            out.append((f"{modname}.{name}", own))
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                if not (_is_public(attr) or attr in _DOCUMENTED_DUNDERS):
                    continue
                member = vars(obj)[attr]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if not (
                    inspect.isfunction(member)
                    or inspect.ismethoddescriptor(member)
                    or inspect.isbuiltin(member)
                    or isinstance(member, property)
                    or inspect.isgetsetdescriptor(member)
                    or inspect.ismemberdescriptor(member)
                ):
                    continue
                mdoc = getattr(member, "__doc__", None)
                if isinstance(mdoc, str) and mdoc:
                    out.append((f"{modname}.{name}.{attr}", mdoc))
    return out


def _strip_signature_lines(lines: list[str]) -> list[str]:
    """Drop leading 'name(args) -> ret' lines that C functions put in their docstrings."""
    while lines and (_SIGNATURE_RE.match(lines[0].strip()) or not lines[0].strip()):
        lines = lines[1:]
    return lines


def _split_first_sentence(text: str) -> tuple[str, str]:
    """Split whitespace-normalised text after its first sentence."""
    i = 0
    while True:
        m = re.search(r"(?<!\.)[.!?](?=\s|$)", text[i:])  # "..." is not a sentence end
        if m is None:
            return text, ""
        end = i + m.end()
        head = text[:end]
        if head.endswith(_ABBREVIATIONS) or re.search(r"\b[A-Za-z]\.$", head):
            i = end
            continue
        return head.strip(), text[end:].strip()


def docstring_to_pair(doc: str) -> tuple[str, str] | None:
    """Turn a docstring into (query, passage), or None if it does not make a good pair."""
    lines = _strip_signature_lines(inspect.cleandoc(doc).splitlines())
    if not lines:
        return None
    text = "\n".join(lines)
    # The summary is at most the first paragraph; the first sentence is taken from it.
    paragraphs = re.split(r"\n\s*\n", text, maxsplit=1)
    first_par = _WS_RE.sub(" ", paragraphs[0]).strip()
    rest_pars = paragraphs[1] if len(paragraphs) > 1 else ""
    query, tail = _split_first_sentence(first_par)
    passage = _WS_RE.sub(" ", f"{tail} {rest_pars}").strip()
    return _check_pair(query, passage)


def _check_pair(query: str, passage: str) -> tuple[str, str] | None:
    """Apply the length and content filters; cut long passages to MAX_PASSAGE_WORDS words."""
    q_words = query.split()
    if not (MIN_QUERY_WORDS <= len(q_words) <= MAX_QUERY_WORDS):
        return None
    if not re.search(r"[A-Za-z]{3}", query) or query.startswith((">>>", "..", ":")):
        return None
    p_words = passage.split()
    if len(p_words) < MIN_PASSAGE_WORDS:
        return None
    if len(p_words) > MAX_PASSAGE_WORDS:
        passage = " ".join(p_words[:MAX_PASSAGE_WORDS])
    return query, passage


def iter_reference_pairs() -> list[tuple[str, str, str]]:
    """(query, passage, source) from the Language Reference text bundled with pydoc.

    ``pydoc_data.topics`` holds the plain-text sections of the Python Language Reference
    (and a few library pages) that ``help("topic")`` shows. Each prose paragraph with at
    least two sentences gives a pair: its first sentence and the rest of the paragraph.
    Headings, grammar rules, code examples and indented sub-items are skipped.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    out: list[tuple[str, str, str]] = []
    for key in sorted(topics):
        for par in re.split(r"\n\s*\n", topics[key]):
            if not par.strip() or par[0].isspace() or "::=" in par or re.search(r"^[*=\-]{3,}$", par, re.M):
                continue
            text = _WS_RE.sub(" ", par).strip()
            text = re.sub(r"^[*\-] ", "", text)  # a top-level bullet item: drop the marker
            query, passage = _split_first_sentence(text)
            pair = _check_pair(query, passage)
            if pair is not None:
                out.append((pair[0], pair[1], f"pydoc_data.topics.{key}"))
    return out


def build_pairs(max_pairs: int | None, seed: int = SEED, verbose: bool = False) -> list[dict]:
    candidates: list[tuple[str, str, str]] = []  # (query, passage, source)
    modules = iter_stdlib_module_names()
    n_imported = 0
    for name in modules:
        module = safe_import(name)
        if module is None:
            continue
        n_imported += 1
        with warnings.catch_warnings():  # touching deprecated aliases (typing.io, ...) warns
            warnings.simplefilter("ignore")
            documented = iter_documented_objects(module)
        for source, doc in documented:
            pair = docstring_to_pair(doc)
            if pair is not None:
                candidates.append((pair[0], pair[1], source))
    n_doc = len(candidates)
    candidates.extend(iter_reference_pairs())
    if verbose:
        print(
            f"modules: {len(modules)} listed, {n_imported} imported; candidate pairs: "
            f"{n_doc} from docstrings, {len(candidates) - n_doc} from the language reference"
        )

    # Deterministic order before dedupe: by source name (shorter, i.e. higher-level, first).
    candidates.sort(key=lambda c: (c[2].count("."), c[2], c[0], c[1]))
    seen_q: set[str] = set()
    seen_p: set[str] = set()
    pairs: list[dict] = []
    for query, passage, source in candidates:
        qk, pk = query.lower(), passage.lower()
        # Dedupe by query, and by passage too so retrieval has no duplicate "right answers".
        if qk in seen_q or pk in seen_p:
            continue
        seen_q.add(qk)
        seen_p.add(pk)
        pairs.append({"query": query, "passage": passage, "source": source})
    pairs.sort(key=lambda p: (p["source"], p["query"]))
    random.Random(seed).shuffle(pairs)
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    if verbose:
        print(f"pairs after dedupe: {len(seen_q)}; kept: {len(pairs)}")
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--max-pairs", type=int, default=6000, help="keep at most this many pairs (default 6000)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    pairs = build_pairs(args.max_pairs, seed=args.seed, verbose=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8", newline="\n") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    size = args.output.stat().st_size
    print(f"wrote {len(pairs)} pairs, {size / 1e6:.2f} MB -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
