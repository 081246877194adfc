"""The family x export-mode parity table: each decoder family's tiny hub-layout model (peft_export.bench.family_models)
with a LoRA on q/k/v/o/gate/up/down_proj, exported in the four modes and compared with sentence-transformers + PEFT.

Each cell is the max difference of normalised sentence embeddings over real texts (one over max_seq_length tokens),
each text alone and in mixed batches of 8, with no prompt and with each of the family's prompts. For switchable
exports a second figure: no adapter vs sentence-transformers without the adapter, each text alone.

    python scripts/family_parity.py [--families qwen3 gemma3 mistral] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

from peft_export.bench import family_models, texts, tiny_models

LONG_TEXT = " ".join(texts.FALLBACK_SENTENCES[:12])


def measure(family: str, root: Path) -> dict[str, dict]:
    from peft_export import EmbeddingModel

    tokenizer_texts = texts.FALLBACK_SENTENCES + texts.real_sentences(200, seed=1)
    base = family_models.build_family_model(family, root / "base", tokenizer_texts)
    adapter = family_models.add_family_adapter(base, root / "adapter", family)
    sample = texts.real_sentences(14, seed=0) + [LONG_TEXT, "ok"]
    prompts = [None, *family_models.FAMILIES[family].prompts]
    reference, base_reference = tiny_models.st_reference(base, adapter), tiny_models.st_reference(base)
    rows = {}
    for mode in family_models.MODES:
        started = time.perf_counter()
        out = family_models.export_family(mode, base, adapter, root / mode)
        seconds = time.perf_counter() - started
        model = EmbeddingModel(out)
        row = {"vs_st_peft": max(family_models.parity(reference, model, sample, prompts).values()),
               "export_seconds": round(seconds, 1)}
        if mode.startswith("switchable"):
            row["no_adapter_vs_base"] = max(family_models.max_unit_diff(model.encode([t], adapter=False),
                                                                        base_reference.encode([t])) for t in sample)
        rows[mode] = row
        print(f"{family:8s} {mode:20s} {row}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(family_models.FAMILIES))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory(prefix="family-parity-") as tmp:
        for family in args.families:
            results[family] = measure(family, Path(tmp) / family)
    print("\n| family | " + " | ".join(family_models.MODES) + " |")
    print("|---" * (len(family_models.MODES) + 1) + "|")
    for family, rows in results.items():
        cells = []
        for mode in family_models.MODES:
            cell = f"{rows[mode]['vs_st_peft']:.1e}"
            if "no_adapter_vs_base" in rows[mode]:
                cell += f" (base {rows[mode]['no_adapter_vs_base']:.1e})"
            cells.append(cell)
        print(f"| {family} | " + " | ".join(cells) + " |")
    worst = max(row["vs_st_peft"] for rows in results.values() for row in rows.values())
    print(f"\nworst {worst:.2e} (limit 1e-5); python {platform.python_version()}, {platform.machine()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
