"""Reranker models and exports shared by the reranker test modules, each built once per session: the switchable
exports of the tiny BERT CrossEncoder (through the ``zoo``; each test module wraps these in its own fixtures) and
the other families' cases (:func:`reranker_case`: tests/fixtures/reranker_families.py's models, their adapters,
eager references and exports)."""

from __future__ import annotations

from pathlib import Path

from fixtures.build_once import BuiltOnce
from fixtures import text, tiny_models
from fixtures.reranker_families import (RERANKER_FAMILIES, add_reranker_adapter, add_reranker_head_adapter,
                                       build_reranker)
from peft_export import CrossEncoderModel


def _quiet(msg: str) -> None:
    pass


def rerank_adapters(zoo, reranker) -> dict[str, Path]:
    """Two LoRA adapters of the tiny CrossEncoder with different targets and ranks: "qv" (query, value and every
    dense layer, the pooler's included) and "qk" (query and key, rank 8)."""
    second = zoo._once("ce-bert-lora-qk", lambda: tiny_models.add_cross_encoder_adapter(
        reranker["base"], zoo.path("ce-bert-lora-qk"), target_modules=("query", "key"), r=8, alpha=16, seed=2))
    return {"qv": reranker["adapter"], "qk": second}


def switchable_reranker(zoo, reranker) -> Path:
    """The switchable ONNX export of the tiny CrossEncoder with adapters "qv" and "qk"."""
    return zoo.export("ce-bert-switchable", reranker["base"], switchable=True,
                      adapters=[f"{name}={path}" for name, path in rerank_adapters(zoo, reranker).items()])


NLI_LABELS = ("contradiction", "entailment", "neutral")


def nli_reranker(zoo) -> dict[str, Path]:
    """A tiny CrossEncoder with three labels named as an NLI model's (id2label), two LoRA adapters of it
    ("nli-qv", "nli-qk", each with its own trained head) and their switchable ONNX export ("export")."""
    base = zoo._once("ce3-bert", lambda: tiny_models.build_cross_encoder(
        zoo.hf("bert"), zoo.path("ce3-bert"), num_labels=3, labels=NLI_LABELS, seed=3))
    adapters = {
        "nli-qv": zoo._once("ce3-lora-qv", lambda: tiny_models.add_cross_encoder_adapter(
            base, zoo.path("ce3-lora-qv"), target_modules=("query", "value"), seed=4)),
        "nli-qk": zoo._once("ce3-lora-qk", lambda: tiny_models.add_cross_encoder_adapter(
            base, zoo.path("ce3-lora-qk"), target_modules=("query", "key"), r=8, alpha=16, seed=5)),
    }
    export = zoo.export("ce3-bert-switchable", base, switchable=True,
                        adapters=[f"{name}={path}" for name, path in adapters.items()])
    return {"base": base, **adapters, "export": export}


class RerankerCase(BuiltOnce):
    """One family's CrossEncoder, adapter, eager reference and exports; each built on first use, once per session."""

    def __init__(self, name: str, root: Path):
        self.family = RERANKER_FAMILIES[name]
        self.root = root
        super().__init__()

    @property
    def base(self) -> Path:
        texts = text.FALLBACK_SENTENCES + text.real_sentences(200, seed=1)
        return self._once("base", lambda: build_reranker(self.family, self.root, texts))

    @property
    def adapter(self) -> Path:
        return self._once("adapter", lambda: add_reranker_adapter(self.family, self.base, self.root / "adapter"))

    @property
    def head_adapter(self) -> Path:
        """A SEQ_CLS adapter that trains the head (modules_to_save) besides LoRA."""
        return self._once("head-adapter", lambda: add_reranker_head_adapter(self.family, self.base,
                                                                            self.root / "head-adapter"))

    def reference(self, with_adapter: bool | str = True):
        """Eager CrossEncoder with the adapter loaded (``"head"``: the head adapter; False: none)."""
        from fixtures.tiny_models import cross_encoder_reference

        adapter = {True: "adapter", "head": "head_adapter"}.get(with_adapter)
        return self._once(f"reference-{with_adapter}", lambda: cross_encoder_reference(
            self.base, getattr(self, adapter) if adapter else None))

    def lossy(self, mode: str, gate) -> Path:
        """The adapter exported merged in a lossy ``mode``: "onnx-int8", "onnx-int8-static", "onnx-fp16",
        "openvino-int8", "openvino-int4" or "openvino-int8-static", behind ``gate``."""
        def build() -> Path:
            from peft_export import export_onnx_model, export_openvino_model

            fmt, _, kind = mode.partition("-")
            if fmt == "onnx":
                options = {"dtype": "fp16"} if kind == "fp16" else {"quantize": kind}
                return export_onnx_model(str(self.adapter), self.root / mode, gate=gate, log=_quiet, **options).path
            options = {"quantize": kind} if kind == "int8-static" else {"weight_format": kind}
            return export_openvino_model(str(self.adapter), self.root / mode, gate=gate, log=_quiet, **options).path
        return self._once(mode, build)

    def export(self, mode: str) -> Path:
        def build() -> Path:
            from peft_export import export_onnx_model, export_openvino_model

            exporter = export_openvino_model if "openvino" in mode else export_onnx_model
            if mode.startswith("switchable"):  # the adapter as the default of a switchable export over the base
                adapter = self.head_adapter if mode.endswith("-head") else self.adapter
                return exporter(str(self.base), self.root / mode, adapters=[f"a={adapter}"], switchable=True,
                                default_adapter="a", log=_quiet).path
            return exporter(str(self.adapter), self.root / mode, log=_quiet).path
        return self._once(mode, build)

    def model(self, mode: str) -> CrossEncoderModel:
        return self._once(f"model-{mode}", lambda: CrossEncoderModel(self.export(mode)))


_FAMILY_CASES: dict[str, RerankerCase] = {}


def reranker_case(name: str, tmp_path_factory) -> RerankerCase:
    """The session's case of family ``name`` (built on first use, shared by every test module)."""
    if name not in _FAMILY_CASES:
        _FAMILY_CASES[name] = RerankerCase(name, tmp_path_factory.mktemp(f"reranker-{name}"))
    return _FAMILY_CASES[name]


def characters_tokenized(tokenizer, pairs, monkeypatch) -> tuple[int, list]:
    """How many characters ``tokenizer.tokenize_pairs(pairs)`` hands to its tokenizers (the model's and the token
    counter's), and the rows it gives."""
    from peft_export.runtime.token_prefix import TokenCounter

    chars: list[int] = []

    class Counting:
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def encode(self, text, *args, **kwargs):
            chars.append(len(text))
            return self.real.encode(text, *args, **kwargs)

        def encode_batch(self, items, *args, **kwargs):
            chars.extend(len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in items)
            return self.real.encode_batch(items, *args, **kwargs)

    counter = TokenCounter(tokenizer.tokenizer, tokenizer.max_seq_length, tokenizer.do_lower_case)
    counter._tokenizer = Counting(counter._tokenizer)
    monkeypatch.setattr(tokenizer, "_prefixes", counter)
    monkeypatch.setattr(tokenizer, "tokenizer", Counting(tokenizer.tokenizer))
    rows = tokenizer.tokenize_pairs(pairs)
    return sum(chars), [list(r.ids) for r in rows]
