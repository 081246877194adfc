"""Parts shared by the builders of models at published dimensions with random weights
(benchmarks/build_decoder_model.py, benchmarks/build_encoder_model.py): tokenizers trained here on the demo corpus,
saving a Sentence Transformers folder, and a LoRA adapter whose B matrices are non-zero.

The tokenizers have a small vocabulary (a few thousand entries, enough for English texts to split into about as
many tokens as with the real model's tokenizer); the embedding matrix keeps the published number of rows, so the
graph's size and the work per token are the real model's.
"""

from __future__ import annotations

from pathlib import Path

# Scale applied to the random lora_B matrices: keeps the update small, as a trained adapter's is, so the model stays
# well-conditioned (random B of full size swamps the base weights).
LORA_B_SCALE = 0.05


def byte_level_bpe(texts: list[str], vocab: int, specials: list[str]):
    """A byte-level BPE ``tokenizers.Tokenizer`` (GPT-2 / Qwen / OLMo style) trained on ``texts``; ``specials`` get
    the first ids. The caller sets the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_unigram(texts: list[str], vocab: int, specials: list[str]):
    """A SentencePiece-style Unigram ``tokenizers.Tokenizer`` (XLM-R / T5 style: NFKC, Metaspace) trained on
    ``texts``; ``specials`` get the first ids. The caller sets the post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    unk = "<unk>" if "<unk>" in specials else None
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab, special_tokens=specials, unk_token=unk))
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return tok


def save_st_model(hf_folder: Path, st_folder: Path, pooling: str, max_seq_length: int, *, normalize: bool = True,
                  prompts: dict[str, str] | None = None):
    """Save Transformer(hf_folder) -> Pooling(pooling) -> Normalize? as a Sentence Transformers folder; the model."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    transformer = Transformer(str(hf_folder), max_seq_length=max_seq_length)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling,
                                    include_prompt=True)]
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu", prompts=prompts)
    model.save(str(st_folder))
    return model


def save_random_lora(st_model, adapter_folder: Path, targets, rank: int = 16, seed: int = 1) -> Path:
    """Add a LoRA (r=``rank``, alpha 2r, on ``targets``) with B non-zero to ``st_model`` and save the adapter alone."""
    import torch
    from peft import LoraConfig

    torch.manual_seed(seed)
    st_model.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                    init_lora_weights=False))
    with torch.no_grad():
        for name, param in st_model.named_parameters():
            if "lora_B" in name:
                param.mul_(LORA_B_SCALE)
    st_model.save_pretrained(str(adapter_folder))
    return adapter_folder
