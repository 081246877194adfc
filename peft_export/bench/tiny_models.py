"""Tiny encoders built offline from configs, saved as transformers and Sentence Transformers folders, plus
LoRA adapters for them initialised non-zero (so that they change the embeddings).

Sizes are tiny (hidden 32, 2 layers, vocab of a few hundred) so that an export takes a couple of seconds.
Tokenizers are trained here with the ``tokenizers`` library on real sentences: WordPiece for BERT/DistilBERT,
byte-level BPE for RoBERTa.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HIDDEN = 32
MAX_SEQ_LENGTH = 64
VOCAB_SIZE = 600


@dataclass(frozen=True)
class Arch:
    name: str
    target_modules: tuple[str, ...]  # attention and feed-forward projections
    uses_token_type_ids: bool


ARCHS = {
    "bert": Arch("bert", ("query", "key", "value", "dense"), True),
    "roberta": Arch("roberta", ("query", "value", "dense"), False),
    "distilbert": Arch("distilbert", ("q_lin", "v_lin", "out_lin", "lin1", "lin2"), False),
}


def _wordpiece_tokenizer(texts: list[str], fast_class):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    return fast_class(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=MAX_SEQ_LENGTH,
    )


def _byte_level_bpe_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, RoBERTa's layout (pad = 1)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE + 100, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return RobertaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=MAX_SEQ_LENGTH,
    )


def build_tokenizer(arch: str, texts: list[str]):
    from transformers import BertTokenizerFast, DistilBertTokenizerFast

    if arch == "bert":
        return _wordpiece_tokenizer(texts, BertTokenizerFast)
    if arch == "distilbert":
        return _wordpiece_tokenizer(texts, DistilBertTokenizerFast)
    if arch == "roberta":
        return _byte_level_bpe_tokenizer(texts)
    raise ValueError(f"unknown arch {arch!r}")


def _model_config(arch: str, vocab_size: int, hidden: int):
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    if arch == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=37, max_position_embeddings=128, type_vocab_size=2)
    if arch == "roberta":
        # Positions start after the padding index: MAX_SEQ_LENGTH tokens need MAX_SEQ_LENGTH + 2 positions.
        return RobertaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=37, max_position_embeddings=MAX_SEQ_LENGTH + 2, type_vocab_size=1,
                             pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if arch == "distilbert":
        return DistilBertConfig(vocab_size=vocab_size, dim=hidden, n_layers=2, n_heads=2, hidden_dim=37,
                                max_position_embeddings=128, pad_token_id=0)
    raise ValueError(f"unknown arch {arch!r}")


def build_hf_encoder(arch: str, folder: Path, texts: list[str], *, seed: int = 0, hidden: int = HIDDEN) -> Path:
    """A randomly initialised transformers encoder + fast tokenizer, saved as safetensors in ``folder``."""
    import torch
    from transformers import AutoModel

    tokenizer = build_tokenizer(arch, texts)
    torch.manual_seed(seed)
    model = AutoModel.from_config(_model_config(arch, len(tokenizer), hidden))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").is_file() and (folder / "model.safetensors").is_file()
    return folder


def build_st_model(
    hf_folder: Path,
    folder: Path,
    *,
    pooling: str | tuple[str, ...] = "mean",
    dense: list[tuple[int, Any]] | None = None,
    normalize: bool = True,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    include_prompt: bool = True,
    similarity_fn_name: str | None = None,
    max_seq_length: int = MAX_SEQ_LENGTH,
    seed: int = 0,
) -> Path:
    """Save a Sentence Transformers folder: Transformer -> Pooling -> Dense* -> Normalize?."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    torch.manual_seed(seed)
    transformer = Transformer(str(hf_folder), max_seq_length=max_seq_length)
    dim = transformer.get_embedding_dimension()
    modules: list[torch.nn.Module] = [transformer, Pooling(dim, pooling_mode=pooling, include_prompt=include_prompt)]
    width = dim * (len(pooling) if isinstance(pooling, tuple) else 1)
    for out_features, activation in dense or []:
        modules.append(Dense(width, out_features, activation_function=activation))
        width = out_features
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu", prompts=prompts, default_prompt_name=default_prompt_name,
                                similarity_fn_name=similarity_fn_name)
    model.save(str(folder))
    return folder


def _lora_config(target_modules, r: int, alpha: float, **extra):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=False, **extra)


def add_st_adapter(st_folder: Path, folder: Path, *, target_modules, r: int = 4, alpha: float = 8, seed: int = 1,
                   **extra) -> Path:
    """An adapter-only Sentence Transformers folder, as ``model.add_adapter(...); model.save_pretrained(dir)`` makes."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(st_folder), device="cpu")
    torch.manual_seed(seed)
    model.add_adapter(_lora_config(target_modules, r, alpha, **extra))
    model.save_pretrained(str(folder))
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "config.json").exists()
    return folder


def add_peft_adapter(hf_folder: Path, folder: Path, *, target_modules, r: int = 4, alpha: float = 8, seed: int = 1,
                     zero_b: bool = False, **extra) -> Path:
    """A plain PEFT adapter (``get_peft_model(...).save_pretrained``) over a transformers encoder."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModel

    base = AutoModel.from_pretrained(str(hf_folder))
    torch.manual_seed(seed)
    model = get_peft_model(base, _lora_config(target_modules, r, alpha, **extra))
    if zero_b:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.zero_()
    model.save_pretrained(str(folder))
    return folder


def st_reference(base_folder: Path, adapter_folder: Path | None = None):
    """sentence-transformers itself, with the adapter loaded the documented way."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(base_folder), device="cpu")
    if adapter_folder is not None:
        model.load_adapter(str(adapter_folder))
    return model.eval()


_LEGACY_TYPES = {
    "transformer": "sentence_transformers.models.Transformer",
    "pooling": "sentence_transformers.models.Pooling",
    "dense": "sentence_transformers.models.Dense",
    "normalize": "sentence_transformers.models.Normalize",
}
_LEGACY_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def to_legacy_layout(st_folder: Path, folder: Path) -> Path:
    """Copy an ST folder and rewrite it the way sentence-transformers 2.x-4.x wrote it
    (``sentence_transformers.models.*`` types, boolean ``pooling_mode_*`` keys)."""
    shutil.copytree(st_folder, folder)
    modules = json.loads((folder / "modules.json").read_text())
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1].lower()
        module["type"] = _LEGACY_TYPES[kind]
        if kind == "pooling":
            path = folder / module["path"] / "config.json"
            cfg = json.loads(path.read_text())
            modes = cfg.pop("pooling_mode")
            modes = [modes] if isinstance(modes, str) else modes
            legacy = {"word_embedding_dimension": cfg.pop("embedding_dimension")}
            legacy.update({key: mode in modes for mode, key in _LEGACY_POOLING_KEYS.items()})
            legacy["include_prompt"] = cfg.get("include_prompt", True)
            path.write_text(json.dumps(legacy, indent=2))
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    return folder


def build_cross_encoder(hf_folder: Path, folder: Path, *, num_labels: int = 1, seed: int = 0,
                        max_length: int = MAX_SEQ_LENGTH, head_scale: float = 2.0,
                        labels: tuple[str, ...] | None = None) -> Path:
    """A sentence-transformers CrossEncoder over the encoder in ``hf_folder`` (its sequence-classification head
    initialised with weights ``head_scale`` times larger than transformers' default, so scores spread like a
    trained reranker's), saved with ``CrossEncoder.save_pretrained`` in the real hub layout. ``labels``: the
    config's id2label names (one per label; transformers' LABEL_i where None)."""
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(seed)
    model = CrossEncoder(str(hf_folder), num_labels=num_labels, max_length=max_length, device="cpu")
    if labels is not None:
        assert len(labels) == num_labels, (labels, num_labels)
        model.model.config.id2label = dict(enumerate(labels))
        model.model.config.label2id = {name: i for i, name in enumerate(labels)}
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if name.startswith("classifier."):
                param.normal_(0.0, head_scale)
    model.save_pretrained(str(folder))
    assert (folder / "config_sentence_transformers.json").is_file() and (folder / "model.safetensors").is_file()
    return folder


def add_cross_encoder_adapter(ce_folder: Path, folder: Path, *, target_modules, r: int = 4, alpha: float = 8,
                              seed: int = 1, **extra) -> Path:
    """An adapter-only CrossEncoder folder, as ``CrossEncoder(base).add_adapter(...); save_pretrained(dir)`` makes
    it (its adapter_config.json names ``ce_folder`` as the base)."""
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(ce_folder), device="cpu")
    torch.manual_seed(seed)
    model.add_adapter(_lora_config(target_modules, r, alpha, **extra))
    model.save_pretrained(str(folder))
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    return folder


def cross_encoder_reference(base_folder: Path, adapter_folder: Path | None = None):
    """sentence-transformers' CrossEncoder itself, with the adapter loaded the documented way."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(base_folder), device="cpu")
    if adapter_folder is not None:
        model.load_adapter(str(adapter_folder))
    return model.eval()
