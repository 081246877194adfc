"""Tiny decoder-based embedding models built offline in their families' hub layouts, with LoRA adapters.

* Qwen3 (Qwen3-Embedding): ``Qwen3Model``, grouped-query attention, byte-level BPE whose post-processor appends
  ``<|endoftext|>`` (also the pad token), left padding, last-token pooling, Normalize, an instruction "query" prompt.
* Gemma3 with bidirectional attention (EmbeddingGemma): ``Gemma3TextModel`` with ``use_bidirectional_attention``,
  sliding-window layers with a window smaller than the test sentences, a SentencePiece-style BPE with byte fallback
  that adds ``<bos>`` and ``<eos>``, right padding, mean pooling, Dense(hidden -> 4 hidden) and Dense(4 hidden ->
  hidden) without bias or activation, Normalize, the "query"/"document" prompts.
* Mistral (e5-mistral): ``MistralModel``, a Llama-style tokenizer adding ``<s>`` and ``</s>``, ``</s>`` as pad, left
  padding, last-token pooling, Normalize, an instruction "query" prompt; Llama (``LlamaModel``) the same way, with
  "query: "/"passage: " prompts.

Sizes are tiny (hidden 32, 2 layers) so that an export takes seconds. LoRA targets the seven projections
(q/k/v/o/gate/up/down_proj), initialised non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .tiny_models import MAX_SEQ_LENGTH, VOCAB_SIZE

HIDDEN = 32
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GEMMA_SLIDING_WINDOW = 4  # stored value; transformers uses 4 // 2 + 1 = 3 with bidirectional attention


@dataclass(frozen=True)
class Family:
    name: str
    pooling: str
    prompts: dict[str, str]
    dense: tuple[tuple[int, int], ...] = ()  # (in, out) per Dense module
    target_modules: tuple[str, ...] = DECODER_TARGETS
    padding_side: str = "left"
    extra: dict = field(default_factory=dict)


FAMILIES = {
    "qwen3": Family("qwen3", "lasttoken", {
        "query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
        "document": ""}),
    "gemma3": Family("gemma3", "mean", {
        "query": "task: search result | query: ", "document": "title: none | text: ",
        "Classification": "task: classification | query: "},
        dense=((HIDDEN, 4 * HIDDEN), (4 * HIDDEN, HIDDEN)), padding_side="right"),
    "mistral": Family("mistral", "lasttoken", {
        "query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "}),
    "llama": Family("llama", "lasttoken", {"query": "query: ", "document": "passage: "}),
}


def _byte_level_bpe(texts: list[str]):
    """Qwen2-style byte-level BPE; the post-processor appends <|endoftext|> as Qwen3-Embedding's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE + 100, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    eos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A:0 <|endoftext|>:0", pair="$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", eos)])
    tok.decoder = decoders.ByteLevel()
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None, model_max_length=MAX_SEQ_LENGTH, padding_side="left")


def _sentencepiece_bpe(texts: list[str], specials: list[str], bos: str, eos: str, pad: str, tokenizer_class,
                       padding_side: str):
    """SentencePiece-style BPE (metaspace, byte fallback) whose post-processor adds ``bos`` and ``eos``; ``specials``
    in the hub checkpoint's id order (Gemma: pad 0, eos 1, bos 2; Llama/Mistral: unk 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    from tokenizers import pre_tokenizers

    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE + 300, special_tokens=specials + byte_tokens)
    tok.train_from_iterator(texts, trainer)
    tok.normalizer = None  # Metaspace does the space replacement, as Llama/Gemma tokenizer.json files do today
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0", pair=f"{bos}:0 $A:0 {eos}:0 {bos}:1 $B:1 {eos}:1",
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tokenizer_class(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token="<unk>",
                           model_max_length=MAX_SEQ_LENGTH, padding_side=padding_side)


def build_tokenizer(family: str, texts: list[str]):
    from transformers import GemmaTokenizerFast, LlamaTokenizerFast

    if family == "qwen3":
        return _byte_level_bpe(texts)
    if family == "gemma3":
        return _sentencepiece_bpe(texts, ["<pad>", "<eos>", "<bos>", "<unk>"], "<bos>", "<eos>", "<pad>",
                                  GemmaTokenizerFast, FAMILIES[family].padding_side)
    if family in ("mistral", "llama"):
        return _sentencepiece_bpe(texts, ["<unk>", "<s>", "</s>"], "<s>", "</s>", "</s>", LlamaTokenizerFast,
                                  FAMILIES[family].padding_side)
    raise ValueError(f"unknown family {family!r}")


def model_config(family: str, tokenizer, hidden: int = HIDDEN):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen3Config

    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden + 6,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                  max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.convert_tokens_to_ids(tokenizer.eos_token))
    if family == "qwen3":
        return Qwen3Config(**common, tie_word_embeddings=True, rope_theta=1_000_000)
    if family == "gemma3":
        # One sliding and one full layer; the window (3 after transformers' bidirectional adjustment) is smaller
        # than the test sentences, so the sliding layers' mask matters.
        return Gemma3TextConfig(**common, bos_token_id=tokenizer.bos_token_id, sliding_window=GEMMA_SLIDING_WINDOW,
                                layer_types=["sliding_attention", "full_attention"],
                                use_bidirectional_attention=True, query_pre_attn_scalar=hidden // 4)
    if family == "mistral":
        return MistralConfig(**common, bos_token_id=tokenizer.bos_token_id, sliding_window=4096)  # e5-mistral's
    if family == "llama":
        return LlamaConfig(**common, bos_token_id=tokenizer.bos_token_id)
    raise ValueError(f"unknown family {family!r}")


def build_family_model(family: str, folder: Path, texts: list[str], *, seed: int = 0, hidden: int = HIDDEN) -> Path:
    """A Sentence Transformers folder in ``family``'s hub layout (transformer files at the top level)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers import AutoModel

    spec = FAMILIES[family]
    hf_folder = folder.with_name(folder.name + "-hf")
    tokenizer = build_tokenizer(family, texts)
    torch.manual_seed(seed)
    model = AutoModel.from_config(model_config(family, tokenizer, hidden))
    model.save_pretrained(str(hf_folder))
    tokenizer.save_pretrained(str(hf_folder))
    transformer = Transformer(str(hf_folder), max_seq_length=MAX_SEQ_LENGTH)
    modules: list[torch.nn.Module] = [transformer, Pooling(hidden, pooling_mode=spec.pooling)]
    for in_features, out_features in spec.dense:
        modules.append(Dense(in_features, out_features, bias=False, activation_function=torch.nn.Identity()))
    modules.append(Normalize())
    st = SentenceTransformer(modules=modules, device="cpu", prompts=spec.prompts)
    st.save(str(folder))
    return folder


def add_family_adapter(st_folder: Path, folder: Path, family: str, *, r: int = 4, alpha: float = 8,
                       seed: int = 1) -> Path:
    """An adapter-only Sentence Transformers folder with LoRA (B non-zero) on the family's usual targets."""
    import torch
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(st_folder), device="cpu")
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=list(FAMILIES[family].target_modules),
                                 init_lora_weights=False))
    model.save_pretrained(str(folder))
    return folder


MODES = ("merged-onnx", "switchable-onnx", "merged-openvino", "switchable-openvino")
ADAPTER_NAME = "lora"


def export_family(mode: str, st_folder: Path, adapter_folder: Path, out: Path) -> Path:
    """Export ``st_folder`` with the adapter in one of :data:`MODES` (fp32)."""
    from peft_export import export_onnx_model, export_openvino_model

    exporter = export_openvino_model if mode.endswith("openvino") else export_onnx_model
    if mode.startswith("switchable"):
        exporter(str(st_folder), out, adapters=[f"{ADAPTER_NAME}={adapter_folder}"], switchable=True,
                 default_adapter=ADAPTER_NAME, log=lambda msg: None)
    else:
        exporter(str(adapter_folder), out, log=lambda msg: None)
    return out


def max_unit_diff(a, b) -> float:
    """Largest difference of two sets of vectors after L2 normalisation, in float64."""
    import numpy as np

    from ..runtime.similarity import normalize

    return float(np.abs(normalize(np.asarray(a, dtype=np.float64)) - normalize(np.asarray(b, dtype=np.float64))).max())


def parity(reference, model, texts: list[str], prompt_names, *, adapter=None) -> dict[str, float]:
    """Max difference of normalised embeddings, ``model`` (runtime) vs ``reference`` (sentence-transformers), per
    prompt name: each text alone (batch 1) and in mixed-length batches of 8."""
    result = {}
    kwargs = {} if adapter is None else {"adapter": adapter}
    for name in prompt_names:
        mixed = max_unit_diff(model.encode(texts, batch_size=8, prompt_name=name, **kwargs),
                              reference.encode(texts, batch_size=8, prompt_name=name))
        single = max(max_unit_diff(model.encode([t], batch_size=1, prompt_name=name, **kwargs),
                                   reference.encode([t], batch_size=1, prompt_name=name)) for t in texts[:6])
        result[f"{name or 'none'}/batch1"] = single
        result[f"{name or 'none'}/mixed"] = mixed
    return result
