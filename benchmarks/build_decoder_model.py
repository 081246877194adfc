"""Build a Qwen3-Embedding-0.6B-sized Sentence Transformers model with random weights, plus a LoRA adapter, offline.

The layout is Qwen3-Embedding's: Qwen3Model -> last-token Pooling -> Normalize, left padding, the tokenizer's
post-processor appending ``<|endoftext|>``, a ``query`` instruction prompt. The dimensions are the published ones
(hidden 1024, 28 layers, 16 heads, 8 key/value heads, head dim 128, FFN 3072, vocab 151,669); the weights are
random, which is enough for speed and memory measurements (not for quality). The tokenizer is a byte-level BPE
trained here on the demo corpus (vocabulary 8,000, so English texts split into about as many tokens as with
Qwen's tokenizer); the embedding matrix still has Qwen3's 151,669 rows.

The adapter is LoRA r=16, alpha 32 on q/k/v/o/gate/up/down_proj, B initialised non-zero.

    python benchmarks/build_decoder_model.py --out /tmp/qwen3-0.6b          # ~2.4 GB, about a minute
    python benchmarks/build_decoder_model.py --out /tmp/qwen3-tiny --layers 2 --hidden 64 --vocab 9000
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peft_export.bench.random_models import byte_level_bpe, save_random_lora, save_st_model
from peft_export.bench.texts import corpus_texts

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


def build_tokenizer(texts: list[str], vocab: int, max_len: int):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(texts, vocab, ["<|endoftext|>"])
    eos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1",
                                                       special_tokens=[("<|endoftext|>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left", model_max_length=max_len)


def build(out: Path, *, layers: int = 28, hidden: int = 1024, heads: int = 16, kv_heads: int = 8,
          head_dim: int = 128, ffn: int = 3072, vocab: int = 151_669, max_len: int = 8192, rank: int = 16,
          tok_vocab: int = 8000, seed: int = 0) -> tuple[Path, Path]:
    """``(sentence-transformers folder, adapter folder)`` under ``out``."""
    import torch
    from transformers import AutoModel, Qwen3Config

    hf, st, adapter = out / "hf", out / "st", out / "adapter"
    tokenizer = build_tokenizer(corpus_texts(), tok_vocab, max_len)
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=ffn,
                         max_position_embeddings=max(max_len, 32768), tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(str(hf))
    tokenizer.save_pretrained(str(hf))
    del model
    st_model = save_st_model(hf, st, "lasttoken", max_len, prompts={"query": QUERY_PROMPT, "document": ""})
    save_random_lora(st_model, adapter, TARGETS, rank=rank, seed=seed + 1)
    return st, adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=151_669)
    parser.add_argument("--max-seq-length", type=int, default=8192)
    args = parser.parse_args(argv)
    st, adapter = build(args.out, layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                        head_dim=args.head_dim, ffn=args.ffn, vocab=args.vocab, max_len=args.max_seq_length)
    print(f"model: {st}\nadapter: {adapter}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
