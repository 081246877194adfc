"""The direction of dependencies between the subpackages (docs/layout.md), checked by import-linter with the
contracts in pyproject.toml: every import counts, also those inside functions."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import peft_export

try:
    import tomllib
except ImportError:  # Python 3.10: import-linter's own TOML reader
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _contracts() -> list[dict]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]


def _layered_names() -> set[str]:
    layers = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    return {name.strip() for layer in layers for name in layer.replace(":", "|").split("|")}


def _lint_imports(folder: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    """import-linter on ``folder``'s pyproject.toml, in a child process (it configures logging for its own output)."""
    pytest.importorskip("importlinter", reason="import-linter checks the contracts (pip install import-linter)")
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(pythonpath)})


def test_the_import_contracts_hold():
    result = _lint_imports(ROOT, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") == len(_contracts()), result.stdout


def test_every_subpackage_and_top_module_has_a_layer():
    """A new subpackage or top-level module outside the layers would escape the contract: each must be placed."""
    placed = _layered_names()
    names = {f"peft_export.{info.name}" for info in pkgutil.iter_modules(peft_export.__path__)}
    assert names - placed == set(), f"add {sorted(names - placed)} to the layers contract in pyproject.toml"
    assert placed - names == set(), f"the layers contract names modules that do not exist: {sorted(placed - names)}"


def test_a_dependency_the_wrong_way_is_caught(tmp_path):
    """The checker really sees a runtime -> export import, even one hidden inside a function (checked on a copy of
    the package, in a child process, so this interpreter's modules stay the real ones)."""
    import shutil

    copy = tmp_path / "peft_export"
    shutil.copytree(Path(peft_export.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__", "*.onnx",
                                                                                            "*.safetensors", "*.jsonl"))
    with open(copy / "runtime" / "similarity.py", "a", encoding="utf-8") as fh:
        fh.write("\n\ndef _wrong_way():\n    from ..export import pipeline  # noqa: F401\n")
    (tmp_path / "pyproject.toml").write_text(PYPROJECT.read_text(encoding="utf-8"), encoding="utf-8")
    result = _lint_imports(tmp_path, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "peft_export.runtime.similarity -> peft_export.export.pipeline" in result.stdout
