"""Build a base-size encoder embedding model with random weights, plus a LoRA adapter, offline: XLM-R-base or
ModernBERT-base at their published dimensions, as Sentence Transformers folders laid out like the embedders built on
them. The weights are random, which is enough for speed and memory measurements (not for quality).

Published dimensions (the models' config.json on the hub):

* ``xlm-roberta`` (FacebookAI/xlm-roberta-base): hidden 768, 12 layers, 12 heads, FFN 3072, vocab 250,002, 514
  positions (512 tokens after the padding offset), pad id 1, type vocab 1. Laid out as multilingual-e5-base /
  paraphrase-multilingual models: XLMRobertaModel -> mean Pooling -> Normalize, max_seq_length 512,
  "query: " / "passage: " prompts. The tokenizer is a SentencePiece-style Unigram (``<s> $A </s>``).
* ``modernbert`` (answerdotai/ModernBERT-base): hidden 768, 22 layers, 12 heads, intermediate 1152 (GLU: Wi is
  768 -> 2304), vocab 50,368, global attention every 3rd layer (global RoPE theta 160,000), the others a local
  window of 128 tokens (RoPE theta 10,000), 8,192 positions, no biases. Laid out as gte-modernbert-base /
  nomic modernbert-embed-base: ModernBertModel -> mean Pooling -> Normalize, max_seq_length 8192,
  "search_query: " / "search_document: " prompts. The tokenizer is a byte-level BPE (``[CLS] $A [SEP]``, no
  token_type_ids).

The tokenizers are trained here on the demo corpus (vocabulary 8,000); the embedding matrix keeps the published
number of rows. The adapter is LoRA r=16, alpha 32 on the family's usual targets (export/families.py lora_targets:
query/key/value/dense for XLM-R, Wqkv/Wo/Wi for ModernBERT), B initialised non-zero.

    python benchmarks/build_encoder_model.py --family xlm-roberta --out /tmp/xlmr-base     # ~1.1 GB
    python benchmarks/build_encoder_model.py --family modernbert --out /tmp/modernbert-base  # ~0.6 GB
    python benchmarks/build_encoder_model.py --family modernbert --out /tmp/mb-tiny --layers 3 --hidden 64 \\
        --heads 2 --ffn 96 --vocab 9000
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from peft_export.bench.random_models import byte_level_bpe, save_random_lora, save_st_model, sentencepiece_unigram
from peft_export.bench.texts import corpus_texts


@dataclass(frozen=True)
class Published:
    """A family's published base-size dimensions and its embedders' Sentence Transformers layout."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    max_seq_length: int
    prompts: dict[str, str]


PUBLISHED = {
    "xlm-roberta": Published(layers=12, hidden=768, heads=12, ffn=3072, vocab=250_002, max_seq_length=512,
                             prompts={"query": "query: ", "passage": "passage: "}),
    "modernbert": Published(layers=22, hidden=768, heads=12, ffn=1152, vocab=50_368, max_seq_length=8192,
                            prompts={"query": "search_query: ", "document": "search_document: "}),
}
MODERNBERT_GLOBAL_EVERY = 3
MODERNBERT_LOCAL_WINDOW = 128


def xlmr_tokenizer(texts: list[str], vocab: int, max_len: int):
    """xlm-roberta-base's layout: specials <s> <pad> </s> <unk> at ids 0..3, <mask> last, ``<s> $A </s>``."""
    from tokenizers import processors
    from transformers import XLMRobertaTokenizerFast

    tok = sentencepiece_unigram(texts, vocab, ["<s>", "<pad>", "</s>", "<unk>"])
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=max_len)


def modernbert_tokenizer(texts: list[str], vocab: int, max_len: int):
    """ModernBERT's layout: byte-level BPE, specials after the vocabulary, ``[CLS] $A [SEP]``, no token_type_ids."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(texts, vocab, [])
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "attention_mask"], model_max_length=max_len)


def model_config(family: str, tokenizer, *, layers: int, hidden: int, heads: int, ffn: int, vocab: int,
                 max_len: int):
    from transformers import ModernBertConfig, XLMRobertaConfig

    if family == "xlm-roberta":
        # Positions start after the padding index: max_len tokens need max_len + 2 positions (514 for 512).
        return XLMRobertaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=max_len + 2,
                                type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return ModernBertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=ffn, max_position_embeddings=max_len,
                            global_attn_every_n_layers=MODERNBERT_GLOBAL_EVERY,
                            local_attention=MODERNBERT_LOCAL_WINDOW, pad_token_id=tokenizer.pad_token_id,
                            cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)


def build(family: str, out: Path, *, layers: int | None = None, hidden: int | None = None, heads: int | None = None,
          ffn: int | None = None, vocab: int | None = None, max_len: int | None = None, rank: int = 16,
          tok_vocab: int = 8000, seed: int = 0) -> tuple[Path, Path]:
    """``(sentence-transformers folder, adapter folder)`` under ``out``; dimensions not given are the published
    ones."""
    import torch
    from transformers import AutoModel

    from peft_export.export.families import family_for

    published = PUBLISHED[family]
    dims = dict(layers=layers or published.layers, hidden=hidden or published.hidden,
                heads=heads or published.heads, ffn=ffn or published.ffn, vocab=vocab or published.vocab,
                max_len=max_len or published.max_seq_length)
    hf, st, adapter = out / "hf", out / "st", out / "adapter"
    build_tokenizer = xlmr_tokenizer if family == "xlm-roberta" else modernbert_tokenizer
    tokenizer = build_tokenizer(corpus_texts(), tok_vocab, dims["max_len"])
    if len(tokenizer) > dims["vocab"]:
        raise SystemExit(f"--vocab {dims['vocab']} is smaller than the tokenizer's {len(tokenizer)} entries; "
                         f"give at least {len(tokenizer)}")
    torch.manual_seed(seed)
    model = AutoModel.from_config(model_config(family, tokenizer, **dims))
    model.save_pretrained(str(hf))
    tokenizer.save_pretrained(str(hf))
    del model
    st_model = save_st_model(hf, st, "mean", dims["max_len"], prompts=published.prompts)
    save_random_lora(st_model, adapter, family_for(family).lora_targets, rank=rank, seed=seed + 1)
    return st, adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(PUBLISHED), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, help="default: the published number")
    parser.add_argument("--hidden", type=int, help="default: the published size")
    parser.add_argument("--heads", type=int, help="default: the published number")
    parser.add_argument("--ffn", type=int, help="FFN / intermediate size (default: the published one)")
    parser.add_argument("--vocab", type=int, help="embedding rows (default: the published vocabulary)")
    parser.add_argument("--max-seq-length", type=int, help="default: the published one")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha is twice it)")
    args = parser.parse_args(argv)
    st, adapter = build(args.family, args.out, layers=args.layers, hidden=args.hidden, heads=args.heads,
                        ffn=args.ffn, vocab=args.vocab, max_len=args.max_seq_length, rank=args.rank)
    print(f"model: {st}\nadapter: {adapter}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
