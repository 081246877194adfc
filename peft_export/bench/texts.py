"""Real text for benchmarks and tests: the bundled demo corpus when it is there, else sentences written here
(and first sentences of standard-library docstrings), plus the corpus files the corpus benchmarks read."""

from __future__ import annotations

import inspect
import json
import random
import re
from pathlib import Path

# Real sentences (documentation-style prose), used when peft_export.demo is not importable and as a fixed,
# version-independent set for tokenizer training.
FALLBACK_SENTENCES = [
    "How do I reset my password?",
    "The quick brown fox jumps over the lazy dog.",
    "Return a new array of given shape and type, filled with zeros.",
    "Sentence embeddings map text to dense vectors so that similar meanings land close together.",
    "Fine-tuning with LoRA adds a low-rank update to selected weight matrices of the network.",
    "Open the file and return a corresponding file object.",
    "If the file cannot be opened, an error is raised.",
    "A context manager that temporarily changes the working directory and restores it on exit.",
    "The train leaves the station at seven in the morning and arrives before noon.",
    "Please send the quarterly report to the finance team by Friday.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She planted tomatoes, basil and peppers in the small garden behind the house.",
    "The library closes early on public holidays.",
    "Split the string at the first occurrence of the separator.",
    "Return a copy of the string with leading and trailing whitespace removed.",
    "The museum exhibits paintings from the late nineteenth century.",
    "Our flight was delayed by two hours because of fog.",
    "Dictionaries map hashable keys to arbitrary values.",
    "A tuple is an immutable sequence, typically used to store collections of heterogeneous data.",
    "The committee will meet again next month to review the proposal.",
    "Set the environment variable before starting the server.",
    "Each worker process handles one request at a time.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Wait until the download completes, then verify the checksum.",
    "Rivers carry sediment from the mountains down to the sea.",
    "The function returns None if the key is not found.",
    "He read the whole novel in a single afternoon.",
    "Raise a ValueError when the argument is out of range.",
    "Local elections are held every four years.",
    "Temperatures are expected to drop sharply overnight.",
    "The test suite runs on every pull request.",
    "Batch size and sequence length are dynamic axes of the exported graph.",
    "Encode the sentences and compare their cosine similarity.",
    "Children learn languages remarkably quickly when they are immersed in them.",
    "The bakery on the corner sells fresh bread every morning.",
    "Never store passwords in plain text.",
    "The moon orbits the earth roughly once every twenty-seven days.",
    "Restart the service after changing its configuration file.",
    "A good night's sleep improves concentration and memory.",
    "The bridge was closed for repairs during the summer.",
]



def _stdlib_sentences() -> list[str]:
    """Sentences from docstrings of the Python standard library (real text, always available offline)."""
    import collections
    import json
    import os
    import pathlib
    import string
    import textwrap

    found: list[str] = []
    for module in (os, pathlib, json, collections, string, textwrap, random, re, inspect):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) or ""
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 3 <= len(sentence.split()) <= 60 and sentence not in found:
                    found.append(sentence)
    return found


def real_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` real sentences/paragraphs of mixed length, deterministic for a given (n, seed)."""
    try:
        from peft_export.demo import load_sentences

        texts = load_sentences(n, seed=seed)
        if len(texts) >= n and all(isinstance(t, str) and t for t in texts):
            return list(texts)
    except (ImportError, OSError, ValueError, KeyError):
        pass  # the demo corpus is optional for the tests
    pool = FALLBACK_SENTENCES + _stdlib_sentences()
    random.Random(seed).shuffle(pool)
    if len(pool) < n:
        pool = [pool[i % len(pool)] for i in range(n)]
    return pool[:n]


def demo_queries_and_sentences(n_queries: int, n_sentences: int, cycle: bool = False) -> tuple[list[str], list[str]]:
    """Short real queries (the demo corpus' held-out ones; repeated to ``n_queries`` with ``cycle``) and real
    sentences of mixed length."""
    from peft_export.demo import load_pairs, load_sentences

    queries = [p["query"] for p in load_pairs("eval")]
    if cycle:
        queries = [queries[i % len(queries)] for i in range(n_queries)]
    return queries[:n_queries], list(load_sentences(n_sentences))


def rerank_query_and_passages(n: int) -> tuple[str, list[str]]:
    """One real query and ``n`` real passages to rank for it (``n`` up to 500): the demo corpus' held-out ("eval")
    pairs, the query's own passage among the others, at a fixed position."""
    from peft_export.demo import load_pairs

    pairs = load_pairs("eval")
    if not 1 <= n <= len(pairs):
        raise ValueError(f"n must be in 1..{len(pairs)}, found {n}")
    passages = [p["passage"] for p in pairs[1:n]]
    passages.insert(min(len(passages), n // 3), pairs[0]["passage"])
    return pairs[0]["query"], passages


def corpus_texts(count: int | None = None, passage_first: bool = False) -> list[str]:
    """Every pair of the demo corpus as two texts, query then passage (or passage then query), the first ``count``."""
    from peft_export.demo import load_pairs

    order = ("passage", "query") if passage_first else ("query", "passage")
    return [row[key] for row in load_pairs() for key in order][:count]


def sentences_with_source(n: int) -> tuple[list[str], str]:
    """``n`` real sentences and where they came from: the demo corpus, else the fallback sentences and docstrings."""
    try:
        from peft_export.demo import load_sentences

        return list(load_sentences(n)), "peft_export.demo corpus"
    except ImportError:
        return real_sentences(n), "Python stdlib docstrings"


# ----- corpus files for the corpus benchmarks -----
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(])")


def distinct_pool() -> list[tuple[str, str, str]]:
    """(text, source, query): every query, and runs of 1-2 consecutive sentences of every passage."""
    from peft_export.demo import load_pairs

    pool, seen = [], set()
    for pair in load_pairs():
        sentences = [s.strip() for s in SENTENCE_END.split(pair["passage"]) if len(s.split()) >= 3]
        candidates = [pair["query"]] + [" ".join(sentences[i:i + n]) for n in (1, 2)
                                        for i in range(len(sentences) - n + 1)]
        for text in candidates:
            if text not in seen:
                seen.add(text)
                pool.append((text, pair["source"], pair["query"]))
    return pool


def _variant(cycle: int, text: str, source: str, query: str) -> str:
    """Cycle 0 is the text itself; later cycles change it so that every text of the corpus is distinct."""
    forms = [
        lambda: text,
        lambda: f"{source}: {text}",
        lambda: f"{text} {query}" if query != text else f"About {source}: {text}",
        lambda: f"Note: {text}",
        lambda: f"In {source.split('.')[0]}, {text[0].lower() + text[1:]}",
        lambda: f"{query} See {source}." if query != text else f"See {source}: {text}",
        lambda: f"{text} (from {source})",
        lambda: f"Question: {query} Answer: {text}",
    ]
    form = forms[cycle % len(forms)]()
    return form if cycle < len(forms) else f"[{cycle}] {form}"


def distinct_texts(n: int) -> list[str]:
    """``n`` distinct real texts: every query and every run of 1 or 2 consecutive sentences of every passage of the
    demo corpus (~10k), cycled, each cycle varying the text (prefixed with the documented object's name, followed by
    the pair's query, ...) so that no two texts are the same string."""
    pool = distinct_pool()
    return [_variant(i // len(pool), *pool[i % len(pool)]) for i in range(n)]


def write_jsonl_corpus(path: Path, n: int) -> None:
    """:func:`distinct_texts` as JSON lines ``{"id": "doc-0000000", "text": ...}``."""
    with open(path, "w", encoding="utf-8") as fh:
        for i, text in enumerate(distinct_texts(n)):
            fh.write(json.dumps({"id": f"doc-{i:07d}", "text": text}) + "\n")


def write_parquet_corpus(path: Path, texts: list[str], parts: int = 0) -> None:
    """``texts`` as a Parquet file with columns id (0..n-1) and text; with ``parts``, the same rows also as that many
    files in the folder ``path`` without its suffix (Ray Data reads one file as one block, which one actor takes
    whole)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, path, row_group_size=1024)
    if parts:
        folder = path.with_suffix("")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        step = -(-len(texts) // parts)
        for k in range(0, len(texts), step):
            pq.write_table(table.slice(k, step), folder / f"part-{k // step}.parquet")
