"""Token counts and prefixes, without tokenizing more of a long text than its first ``max_tokens`` tokens need.

Used by the runtime (``EmbeddingModel.encode`` tokenizes a long text as its prefix, so one input of any size
costs bounded memory), ``peft-export embed`` through it, and the server (admission counts).

The server must know each input's token count (for the limit, the batch budget and admission), and with
``truncate`` it embeds only the first ``max_seq_length`` tokens. Tokenizing a 100,000-character input in full to
keep 256 of its tokens cost most of a 12.9 s request. ``TokenCounter.measure`` tokenizes a prefix instead and
doubles it until the prefix *provably* yields the same first tokens as the whole text:

A tokenizer splits text into pre-tokens (words, punctuation, whitespace runs) and tokenizes each on its own, so
cutting the text can change only the pre-tokens at the cut: the last one (a word cut in half; a WordPiece word of
over 100 characters that becomes [UNK] only when whole) and the one before it (byte-level BPE's whitespace rule
looks one character ahead). When the first token that truncation drops lies in a pre-token before those two,
every kept token is the same as in the whole text, and the text has more tokens than the limit. Otherwise the
prefix doubles, up to the whole text. A tokenizer that reports no pre-token boundaries (``word_ids`` all the
same) always falls back to the whole text, so the result is exact for any tokenizer; the saving needs
pre-tokenization, which BERT, RoBERTa/GPT-2 and SentencePiece (Metaspace) tokenizers all have.
"""

from __future__ import annotations

from typing import Any

# Characters per token the first prefix allows: about twice English's average, so one try is usually enough.
_FIRST_PREFIX_CHARS_PER_TOKEN = 8
_MIN_FIRST_PREFIX = 256


class TokenCounter:
    """Token counts as the model sees them (special tokens included), from a copy of its ``tokenizers`` tokenizer."""

    def __init__(self, tokenizer: Any, max_tokens: int, lower: bool = False):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: the model's own keeps truncating
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.max_tokens = max_tokens
        self.lower = lower
        self.special_tokens = self._tokenizer.num_special_tokens_to_add(False)
        self.content_limit = max(1, max_tokens - self.special_tokens)  # tokens of text that truncation keeps
        self.first_prefix = max(_MIN_FIRST_PREFIX, self.content_limit * _FIRST_PREFIX_CHARS_PER_TOKEN)

    @property
    def untruncated(self) -> Any:
        """The copy of the tokenizer it counts with: no truncation, no padding (never change its settings)."""
        return self._tokenizer

    def count(self, texts: list[str]) -> list[int]:
        """Tokens of each whole text, without truncation."""
        if self.lower:
            texts = [t.lower() for t in texts]
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=True)]

    def prefix_decides(self, prefix: str) -> bool:
        """Whether the first ``content_limit`` tokens of ``prefix`` are those of any text it begins (see module)."""
        encoding = self._tokenizer.encode(prefix.lower() if self.lower else prefix, add_special_tokens=False)
        words = encoding.word_ids
        if len(words) <= self.content_limit:
            return False
        first_dropped, last = words[self.content_limit], words[-1]
        return first_dropped is not None and last is not None and first_dropped < last - 1

    def long_prefix(self, text: str, start: int = 0) -> str | None:
        """A prefix of ``text`` that stands for it (more tokens than the limit, same kept tokens), or None when
        ``text`` must be tokenized whole. ``start``: characters that must stay (a prompt)."""
        size = start + self.first_prefix
        while size < len(text):
            prefix = text[:size]
            if self.prefix_decides(prefix):
                return prefix
            size *= 2
        return None

    def measure(self, texts: list[str], prompt: str = "") -> tuple[list[str], list[int]]:
        """For each text: what to embed and its token count, prompt included.

        A text whose first ``max_tokens`` tokens a prefix decides comes back as that prefix (without the prompt)
        with a count of ``max_tokens + 1``: over the limit, and embedding the prefix with truncation equals
        embedding the whole text with truncation. Other texts come back unchanged with their exact count.
        """
        texts = list(texts)
        counts: list[int | None] = [None] * len(texts)
        whole: list[int] = []
        for i, text in enumerate(texts):
            prefix = self.long_prefix(prompt + text, len(prompt)) if len(text) > self.first_prefix else None
            if prefix is None:
                whole.append(i)
            else:
                texts[i] = prefix[len(prompt):]
                counts[i] = self.max_tokens + 1
        for i, count in zip(whole, self.count([prompt + texts[i] for i in whole])):
            counts[i] = count
        return texts, counts



def truncation_prefix(counter: TokenCounter, text: str, max_chars: int) -> str:
    """What to tokenize for ``text`` so that truncation keeps the same tokens as for the whole text: ``text`` itself
    when short, else the shortest doubling prefix that provably decides the kept tokens (:meth:`long_prefix`),
    searched within the first ``max_chars`` characters; a text whose kept tokens are not decided there (one
    unbroken "word" longer than ``max_chars``) is cut to ``max_chars`` characters, which bounds the cost."""
    if len(text) <= counter.first_prefix:
        return text
    capped = text[:max_chars]
    return counter.long_prefix(capped) or capped
