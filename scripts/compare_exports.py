"""Compare two export folders of the same model: the embeddings they give on fixed texts and their manifests.

For refactors that must not change what an export writes: export with the old code into A, with the new code into
B, then ``python scripts/compare_exports.py A B``. Prints the largest embedding difference, whether the manifests
have the same fields and values (creation time and export duration aside) and whether every file's sha256 is the
same; exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

TEXTS = ["How do I reset my password?", "Resetting a password", "The weather is nice today.", "a " * 300, "x"]
VOLATILE = ("created_unix", "export_seconds")  # differ between any two runs


def _fields(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _fields(value, prefix + key + ".")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="export folder made by the old code")
    parser.add_argument("b", type=Path, help="export folder made by the new code")
    args = parser.parse_args()

    from peft_export import EmbeddingModel

    ea, eb = (EmbeddingModel(folder).encode(TEXTS, batch_size=2) for folder in (args.a, args.b))
    ma, mb = (json.loads((folder / "peft_export.json").read_text(encoding="utf-8")) for folder in (args.a, args.b))
    max_diff = float(np.abs(ea - eb).max())
    same_fields = _fields(ma) == _fields(mb)
    differing = sorted(k for k in set(ma) | set(mb) if k not in VOLATILE and ma.get(k) != mb.get(k))
    same_files = ma.get("export", {}).get("sha256") == mb.get("export", {}).get("sha256")
    print(f"embeddings max |a - b|: {max_diff:.1e}; manifest fields equal: {same_fields}; manifest values that "
          f"differ (besides {', '.join(VOLATILE)}): {', '.join(differing) or 'none'}; every file's sha256 equal: "
          f"{same_files}")
    return 0 if max_diff == 0.0 and same_fields and not differing and same_files else 1


if __name__ == "__main__":
    sys.exit(main())
