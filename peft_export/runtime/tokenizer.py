"""Tokenization with the `tokenizers` library, configured once to match the reference model's settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InvalidInputError
from .batches import plan_batches
from .config import TOKENIZER_FILE, RuntimeConfig
from .export_files import verified_bytes
from .pair_prompts import PairPrompts
from .token_prefix import TokenCounter, truncation_prefix

# Characters of one text ever tokenized: a longer text is tokenized as a prefix that keeps the same tokens under
# truncation (token_prefix), found within this many characters, so one input of any size has bounded cost (a 50 MB
# text tokenized whole took 6.9 GB). At least 32 characters per kept token: only an unbroken run of that many
# characters without a word boundary (no real text) can lose tokens to the cap.
MIN_MAX_TEXT_CHARS = 100_000
CAP_CHARS_PER_TOKEN = 32


class TextTokenizer:
    """Batch tokenizer: truncates to max_seq_length and pads to the longest sequence of each batch (right side)."""

    def __init__(self, folder: Path, config: RuntimeConfig, manifest: dict | None = None):
        """``manifest``: the export's, whose hash of tokenizer.json the bytes read must match (None while an
        export is being written, before its manifest exists)."""
        from tokenizers import Tokenizer

        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise ConfigError(f"{path} not found: the export folder lacks its tokenizer; export the folder again")
        raw = verified_bytes(folder, manifest, TOKENIZER_FILE) if manifest is not None else path.read_bytes()
        try:
            self.tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as err:  # the tokenizers library raises plain Exception for unreadable files
            raise ConfigError(f"{path} is not a readable tokenizers file: {err}") from err
        self.max_seq_length = config.max_seq_length
        self.do_lower_case = config.do_lower_case
        self.tokenizer.enable_truncation(max_length=config.max_seq_length)
        self.tokenizer.no_padding()  # padded in numpy: one pass, exact dtype
        self.pad_token_id = config.pad_token_id
        self.input_names = config.input_names
        self.max_text_chars = max(MIN_MAX_TEXT_CHARS, CAP_CHARS_PER_TOKEN * config.max_seq_length)
        self._prefixes: TokenCounter | None = None  # made on first use (_counter)
        self._layout: list | None | bool = False  # the pair template (_pair_layout), read on first use
        # A reranker's prompts and how each applies (runtime/pair_prompts.py). ``pair_template``: pairs rendered
        # through the model's chat template with the default prompt (export/pair_template.py), or None: the pair
        # template of tokenizer.json's post-processor, the default prompt (``query_prompt``) before the query.
        self.pair_prompts = PairPrompts(config.task_config, folder)
        self.pair_template = self.pair_prompts.default_template
        self.query_prompt = self.pair_prompts.query_prompt
        self._pair_overhead: int | None = None  # pair_token_overhead(), counted on first use

    def truncation_prefixes(self, texts: list[str]) -> list[str]:
        """``texts`` with each long one replaced by the prefix of it that truncation keeps the same tokens of."""
        if all(len(t) <= MIN_MAX_TEXT_CHARS // 8 for t in texts):
            return texts
        return [truncation_prefix(self._counter(), t, self.max_text_chars) for t in texts]

    def _counter(self) -> TokenCounter:
        """Token counts and prefixes (runtime/token_prefix.py), from an untruncated copy of the tokenizer."""
        if self._prefixes is None:
            self._prefixes = TokenCounter(self.tokenizer, self.max_seq_length, self.do_lower_case)
        return self._prefixes

    def _bounded(self, text: str) -> str:
        """One text as :meth:`truncation_prefixes` gives it."""
        return self.truncation_prefixes([text])[0]

    def tokenize(self, texts: list[str]) -> list:
        """``tokenizers.Encoding`` per text (truncated, unpadded): tokenize once, then batch with ``pad``. A long
        text is tokenized as its truncation prefix (same tokens, bounded cost)."""
        try:
            texts = self.truncation_prefixes(texts)
        except TypeError as err:  # a lone surrogate in a long text
            raise InvalidInputError(f"{_first_invalid(texts)}: {err}") from err
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        try:
            return self.tokenizer.encode_batch(texts, add_special_tokens=True)
        except TypeError as err:  # the tokenizers library cannot take a str that is not valid Unicode
            raise InvalidInputError(f"{_first_invalid(texts)}: {err}") from err

    def tokenize_pairs(self, pairs: list[tuple[str, str]], prompt: str | None = None) -> list:
        """An encoding (``ids``, ``type_ids``) per (first, second) text pair, as a cross-encoder reads them (special
        tokens and token type ids of the pair; the longest side truncated first to max_seq_length, as
        transformers' ``truncation=True`` does), assembled from each distinct text's tokens
        (:meth:`_assembled_pairs`). Each long side is tokenized as its truncation prefix: it keeps at
        least max_seq_length tokens, more than truncation can keep of it in a pair. ``prompt``: the reranker's
        prompt (before the query, or the chat template's system message; "" none), None its default."""
        if self.pair_template is not None:
            return self._tokenize_rendered_pairs(pairs, self.pair_prompts.chat_template(prompt), prompt)
        prefix, cap = self.pair_prompts.query_prefix(prompt), self.max_text_chars
        # Each distinct query is cut to the characters truncation_prefix reads before the prompt is joined to it,
        # then bounded and tokenized once per call: rank() puts one query in every pair (prompt + a
        # 1,000,000-character query ranked against 300 documents held 300 copies of it, 300 MB).
        queries = list(dict.fromkeys(p[0] for p in pairs))
        try:
            firsts = [self._bounded(prefix + q[:cap]) for q in queries]
            seconds = [self._bounded(d) for _, d in pairs]
            if self.do_lower_case:
                firsts, seconds = [t.lower() for t in firsts], [t.lower() for t in seconds]
            return self._assembled_pairs(queries, firsts, pairs, seconds)
        except TypeError as err:  # the tokenizers library cannot take a str that is not valid Unicode
            raise InvalidInputError(f"{_first_invalid_pair(pairs, prompt)}: {err}") from err

    def _assembled_pairs(self, queries: list[str], firsts: list[str], pairs: list[tuple[str, str]],
                         seconds: list[str]) -> list:
        """Each distinct first text (``firsts[i]``, prepared from ``queries[i]``) and every second text tokenized
        once, untruncated, and each pair assembled from its two encodings by the tokenizer's own post-processing
        (truncation, special tokens, type ids): what encoding a pair does after tokenizing its two texts, with the
        same ids, type ids and mask (checked on WordPiece, byte-level BPE, SentencePiece BPE and Unigram
        tokenizers). Encoding each pair whole tokenized a query once per passage: a 100,000-character query sent
        once with 500 passages was 50 million characters for the model thread. A pair whose two texts are both
        cut is assembled here instead (:meth:`_both_cut`)."""
        whole = self._untruncated()
        first = dict(zip(queries, whole.encode_batch(firsts, add_special_tokens=False)))
        second = whole.encode_batch(seconds, add_special_tokens=False)
        budget = self.max_seq_length - self.tokenizer.num_special_tokens_to_add(True)  # tokens of the two texts
        layout = self._pair_layout()
        rows = []
        for (query, _), b in zip(pairs, second):
            a = first[query]
            if layout is not None and len(a.ids) + len(b.ids) > budget and min(len(a.ids), len(b.ids)) > budget // 2:
                rows.append(self._both_cut(a, b, budget, layout))
            else:
                rows.append(self.tokenizer.post_process(a, b, add_special_tokens=True))
        return rows

    def _untruncated(self):
        """The tokenizer without truncation or padding (the token counter's copy): a pair is truncated as a whole
        when it is assembled."""
        return self._counter().untruncated

    def _pair_layout(self) -> list | None:
        """The post-processor's pair template as (side: None for a special token, 0 or 1 for a text; token id;
        type id), read from a processed sample pair; None where the sample does not show the two texts whole, in
        order, between special tokens (no supported tokenizer does that; tokenizers then truncates such pairs)."""
        if self._layout is False:
            sample = self._untruncated().encode("a", add_special_tokens=False)
            processed = self._untruncated().post_process(sample, sample, add_special_tokens=True)
            content = [i for i, special in enumerate(processed.special_tokens_mask) if not special]
            n = len(sample.ids)
            ok = (n > 0 and [processed.ids[i] for i in content] == sample.ids * 2
                  and content[:n] == list(range(content[0], content[0] + n))
                  and content[n:] == list(range(content[n], content[n] + n)))
            layout = []
            for i, (token, type_id) in enumerate(zip(processed.ids, processed.type_ids)):
                if i not in content:
                    layout.append((None, token, type_id))
                elif ok and i in (content[0], content[n]):
                    layout.append((0 if i == content[0] else 1, token, type_id))
            self._layout = layout if ok else None
        return self._layout

    @staticmethod
    def _both_cut(a, b, budget: int, layout: list) -> RenderedPair:
        """A pair whose two texts are both cut: the first ``k1`` and ``k2`` tokens of each, as tokenizers'
        longest_first keeps them (half the budget each; the longer text, or the second on a tie, keeps the odd
        token), between the template's special tokens. tokenizers itself also builds every combination of the two
        texts' cut-off parts (its overflowing encodings): quadratic in their lengths, 410 MB for two 8,000-character
        texts without word boundaries on a byte-level BPE tokenizer, far more at the 100,000-character input cap."""
        half = budget // 2
        k1, k2 = (budget - half, half) if len(a.ids) > len(b.ids) else (half, budget - half)
        ids: list[int] = []
        type_ids: list[int] = []
        for side, token, type_id in layout:
            kept = [token] if side is None else a.ids[:k1] if side == 0 else b.ids[:k2]
            ids += kept
            type_ids += [type_id] * len(kept)
        return RenderedPair(ids, type_ids)

    def _tokenize_rendered_pairs(self, pairs: list[tuple[str, str]], template: dict, prompt: str | None) -> list:
        """Pairs as sentence-transformers renders them through a chat template: ``prefix + query + middle +
        document + suffix`` tokenized as one text without added special tokens, truncated on the right, and the
        template's suffix tokens written back over the end of a truncated row (so the last token is the template's
        last, as the model was trained to read it)."""
        cap = self.max_text_chars  # as in tokenize_pairs: no whole copy of a long side per pair
        start, middle, end = template["prefix"], template["middle"], template["suffix"]
        try:
            # A query whose rendered start alone decides the kept tokens (_decided_start) gives the same row with
            # every document: it is bounded and tokenized once. Rendering it per document tokenized a
            # 100,000-character query once per pair (10 s for 100 pairs on the Qwen3 tokenizer).
            decided = {q: self._decided_start(start + q[:cap] + middle) for q in dict.fromkeys(q for q, _ in pairs)}
            texts = [decided[q] or self._bounded(start + q[:cap] + middle + d[:cap] + end) for q, d in pairs]
            if self.do_lower_case:
                texts = [t.lower() for t in texts]
            unique = list(dict.fromkeys(texts))
            encoded = dict(zip(unique, self.tokenizer.encode_batch(unique, add_special_tokens=False)))
        except TypeError as err:  # the tokenizers library cannot take a str that is not valid Unicode
            raise InvalidInputError(f"{_first_invalid_pair(pairs, prompt)}: {err}") from err
        suffix = template["suffix_ids"]
        rows = []
        for enc in (encoded[t] for t in texts):
            ids = list(enc.ids)
            keep = min(len(suffix), len(ids))
            if len(ids) >= self.max_seq_length and keep:
                ids[len(ids) - keep:] = suffix[len(suffix) - keep:]
            rows.append(RenderedPair(ids, [0] * len(ids)))
        return rows

    def _decided_start(self, start: str) -> str | None:
        """What to tokenize for every rendered pair that begins with ``start`` (the template's prefix, the query
        and the template's text before the document), where ``start`` alone decides the tokens truncation keeps:
        its truncation prefix when that is shorter than ``start``, or ``start`` itself when the token counter
        proves it decides them (a query that is one unbroken run is decided by the template's text after it).
        None: the document matters, each pair is rendered."""
        counter = self._counter()
        if len(start) <= counter.first_prefix:
            return None
        bounded = truncation_prefix(counter, start, self.max_text_chars)
        if len(bounded) < len(start):
            return bounded
        return start if counter.prefix_decides(start) else None

    def pair_token_overhead(self, prompt: str | None = None) -> int:
        """Tokens a (query, document) pair holds beyond the two texts' own tokens (each without special tokens):
        the chat template's fixed text, or the pair's special tokens plus the prompt before the query. ``prompt``:
        as :meth:`tokenize_pairs` takes it (None: the default prompt). A boundary may merge one token more or less
        under byte-level BPE; exact enough for request limits. The default prompt's is computed once (servers ask
        on every request)."""
        if prompt is not None:
            return self._count_pair_overhead(prompt)
        if self._pair_overhead is None:
            self._pair_overhead = self._count_pair_overhead(None)
        return self._pair_overhead

    def _count_pair_overhead(self, prompt: str | None) -> int:
        if self.pair_template is not None:
            template = self.pair_prompts.chat_template(prompt)
            fixed = template["prefix"] + template["middle"] + template["suffix"]
            return len(self.tokenizer.encode(fixed.lower() if self.do_lower_case else fixed,
                                             add_special_tokens=False).ids)
        prefix = self.pair_prompts.query_prefix(prompt)
        prefix = prefix.lower() if self.do_lower_case else prefix
        prefix_tokens = len(self.tokenizer.encode(prefix, add_special_tokens=False).ids) if prefix else 0
        return int(self.tokenizer.num_special_tokens_to_add(True)) + prefix_tokens

    def encode_pairs(self, pairs: list[tuple[str, str]], prompt: str | None = None) -> dict[str, np.ndarray]:
        return self.pad(self.tokenize_pairs(pairs, prompt))

    def pad(self, encodings: list) -> dict[str, np.ndarray]:
        """The graph's inputs for ``encodings``, right-padded to the longest of them."""
        width = max((len(e.ids) for e in encodings), default=0)
        batch = len(encodings)
        input_ids = np.full((batch, width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((batch, width), dtype=np.int64)
        token_type_ids = np.zeros((batch, width), dtype=np.int64) if "token_type_ids" in self.input_names else None
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            input_ids[row, :n] = enc.ids
            attention_mask[row, :n] = 1
            if token_type_ids is not None:
                token_type_ids[row, :n] = enc.type_ids
        features = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return {name: features[name] for name in self.input_names}

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self.pad(self.tokenize(texts))

    def batches(self, texts: list[str], batch_size: int, max_batch_tokens: int | None = None
                ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Tokenize ``texts`` once and yield ``(indices, inputs)`` per batch as :func:`plan_batches` plans them
        (longest first); each batch is padded only when it is reached."""
        yield from self.batches_of(self.tokenize(texts), batch_size, max_batch_tokens)

    def batches_of(self, encodings: list, batch_size: int, max_batch_tokens: int | None = None
                   ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """:meth:`batches` of inputs already tokenized (``tokenizers.Encoding`` each, e.g. text pairs)."""
        for index in plan_batches([len(e.ids) for e in encodings], batch_size, max_batch_tokens):
            yield index, self.pad([encodings[i] for i in index])

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenize(texts)]

    def prompt_length(self, prompt: str) -> int:
        """Prompt tokens as sentence-transformers counts them: the leading special token, not the trailing one."""
        ids = self.tokenizer.encode(prompt.lower() if self.do_lower_case else prompt).ids
        special = {i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}
        return len(ids) - 1 if ids and ids[-1] in special else len(ids)


class RenderedPair:
    """Token ids of one pair rendered through a chat template (``tokenizers.Encoding``'s ``ids`` and ``type_ids``)."""

    __slots__ = ("ids", "type_ids")

    def __init__(self, ids: list[int], type_ids: list[int]):
        self.ids, self.type_ids = ids, type_ids


def _first_invalid(texts: list[str], names: list[str] | None = None) -> str:
    """Name the first text that is not valid Unicode (a lone UTF-16 surrogate such as "\\ud800"); ``names``: how
    each text is named (``sentences[i]`` where None)."""
    for index, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            name = f"sentences[{index}]" if names is None else names[index]
            return (f"{name} is not valid Unicode: {err.object[err.start:err.end]!r} at character {err.start} is a "
                    "lone surrogate")
    return "the input could not be tokenized"


def _first_invalid_pair(pairs: list[tuple[str, str]], prompt: str | None) -> str:
    """Name the first text of ``pairs`` (or the prompt) that is not valid Unicode by its place in the call:
    ``prompt``, ``inputs[i][0]`` (the query of pair i) or ``inputs[i][1]`` (its passage; ``documents[i]`` of rank)."""
    texts = ([prompt] if prompt else []) + [text for pair in pairs for text in pair]
    names = (["prompt"] if prompt else []) + [f"inputs[{i}][{side}] (the {what} of pair {i})" for i in range(len(pairs))
                                              for side, what in ((0, "query"), (1, "passage"))]
    return _first_invalid(texts, names)
