"""The direction of dependencies between the subpackages (docs/layout.md), checked by import-linter with the
contracts in pyproject.toml: every import counts, also those inside functions."""

from __future__ import annotations

import pkgutil
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


def test_the_import_contracts_hold(monkeypatch, capsys):
    pytest.importorskip("importlinter", reason="import-linter checks the contracts (pip install import-linter)")
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    code = lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert code == 0, report
    assert "BROKEN" not in report and report.count("KEPT") == len(_contracts()), report


def test_every_subpackage_and_top_module_has_a_layer():
    """A new subpackage or top-level module outside the layers would escape the contract: each must be placed."""
    placed = _layered_names()
    names = {f"peft_export.{info.name}" for info in pkgutil.iter_modules(peft_export.__path__)}
    assert names - placed == set(), f"add {sorted(names - placed)} to the layers contract in pyproject.toml"
    assert placed - names == set(), f"the layers contract names modules that do not exist: {sorted(placed - names)}"


def test_a_dependency_the_wrong_way_is_caught(tmp_path, monkeypatch, capsys):
    """The checker really sees a runtime -> export import, even one hidden inside a function."""
    pytest.importorskip("importlinter", reason="import-linter checks the contracts (pip install import-linter)")
    import shutil

    from importlinter.cli import lint_imports

    copy = tmp_path / "peft_export"
    shutil.copytree(Path(peft_export.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__", "*.onnx",
                                                                                            "*.safetensors", "*.jsonl"))
    with open(copy / "runtime" / "similarity.py", "a", encoding="utf-8") as fh:
        fh.write("\n\ndef _wrong_way():\n    from ..export import pipeline  # noqa: F401\n")
    config = tmp_path / "pyproject.toml"
    config.write_text(PYPROJECT.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == "peft_export" or m.startswith("peft_export.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = lint_imports(config_filename=str(config), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert code == 1
    assert "peft_export.runtime.similarity -> peft_export.export.pipeline" in report
