"""The ``peft-export`` command: merge-onnx prints what it resolved and the parity it measured; info and encode
work on the result; errors exit 2 with one line; --help works on every subcommand."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from conftest import SENTENCE_ATOL
from peft_export.cli import build_parser, main


class CliRun(NamedTuple):
    code: int
    stdout: str
    out: Path
    stderr: str
    warnings: list


@pytest.fixture(scope="module")
def cli_export(bert_case, tmp_path_factory):
    """``peft-export merge-onnx ADAPTER -o OUT`` run once; returns (exit code, stdout, output folder, stderr, every
    warning raised during the run)."""
    out = tmp_path_factory.mktemp("cli") / "exported"
    capture, errors = io.StringIO(), io.StringIO()
    old_stdout, old_stderr, sys.stdout, sys.stderr = sys.stdout, sys.stderr, capture, errors
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main(["merge-onnx", str(bert_case.adapter), "-o", str(out)])
    finally:
        sys.stdout, sys.stderr = old_stdout, old_stderr
    return CliRun(code, capture.getvalue(), out, errors.getvalue(), caught)


def test_merge_onnx_returns_zero_and_reports_resolution_and_parity(cli_export, bert_case):
    code, stdout, out = cli_export[:3]
    assert code == 0
    assert f"base: {bert_case.base}" in stdout
    assert f"adapter 'default': {bert_case.adapter} r=4 alpha=8" in stdout
    merged = re.search(r"merged == unmerged PEFT: max diff ([0-9.e+-]+)", stdout)
    onnx = re.search(r"ONNX Runtime == PyTorch reference: sentence ([0-9.e+-]+), tokens ([0-9.e+-]+)", stdout)
    assert merged and onnx, stdout
    assert float(merged.group(1)) < SENTENCE_ATOL
    assert float(onnx.group(1)) < SENTENCE_ATOL and float(onnx.group(2)) < 1e-4
    assert f"done: {out.absolute()}" in stdout
    assert (out / "peft_export.json").is_file() and (out / "model.onnx").is_file()


def test_merge_onnx_prints_our_progress_without_the_libraries_noise(cli_export):
    """transformers' "Loading weights" bars and the libraries' deprecation notices are silenced during the export;
    our own progress lines stay, and the silencing ends with the command."""
    from transformers.utils import logging as hf_logging

    assert cli_export.code == 0
    assert "Loading weights" not in cli_export.stderr and "it/s]" not in cli_export.stderr
    noise = [f"{w.category.__name__}: {w.message} ({w.filename})" for w in cli_export.warnings
             if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert noise == []
    assert "merged == unmerged PEFT" in cli_export.stdout and "ONNX Runtime == PyTorch reference" in cli_export.stdout
    assert hf_logging.is_progress_bar_enabled()  # restored after the command


def test_merge_onnx_output_equals_the_library_export(cli_export, bert_model, real_texts):
    from peft_export import EmbeddingModel

    texts = real_texts[:10]
    np.testing.assert_allclose(EmbeddingModel(cli_export[2]).encode(texts), bert_model.encode(texts), atol=1e-6)


def test_info_summarises_the_manifest(cli_export, bert_case, capsys):
    out = cli_export[2]
    assert main(["info", str(out)]) == 0
    stdout = capsys.readouterr().out
    manifest = json.loads((out / "peft_export.json").read_text())
    digest = manifest["adapters"][0]["sha256"]["adapter_model.safetensors"]
    assert f"base:        {bert_case.base} (local folder)" in stdout
    assert "revision None" not in stdout
    assert f"adapter:     default <- {bert_case.adapter} r=4 alpha=8 sha256={digest[:12]}..." in stdout
    assert "merge mode:  merged" in stdout
    assert "pooling=['mean'] normalize=True dim=32 max_seq_length=64 similarity=cosine" in stdout
    assert re.search(r"validation:  max abs diff vs PyTorch: sentence_embedding [0-9.e+-]+, token_embeddings", stdout)


def test_info_json_is_the_manifest(cli_export, capsys):
    out = cli_export[2]
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((out / "peft_export.json").read_text())


def test_encode_json_equals_embedding_model(cli_export, bert_model, capsys):
    texts = ["a first sentence", "and a second, longer one"]
    assert main(["encode", str(cli_export[2]), *texts, "--json"]) == 0
    got = np.array(json.loads(capsys.readouterr().out), dtype=np.float32)
    np.testing.assert_allclose(got, bert_model.encode(texts), atol=1e-6)


def test_encode_prints_dimensions_and_similarity(cli_export, capsys):
    assert main(["encode", str(cli_export[2]), "first text", "second text"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("dim=32 norm=1.0000") == 2
    assert "similarity (cosine):" in stdout


def test_encode_reads_stdin(cli_export, bert_model, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("line one\nline two\n"))
    assert main(["encode", str(cli_export[2]), "--json"]) == 0
    got = np.array(json.loads(capsys.readouterr().out), dtype=np.float32)
    np.testing.assert_allclose(got, bert_model.encode(["line one", "line two"]), atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["info", "{tmp}"], r"has no peft_export\.json; is it a peft_export export folder\?"),
    (["encode", "{tmp}/missing", "text"], r"Export folder not found"),
    (["info", "{tmp}/missing"], r"Export folder not found: .*missing$"),  # not "has no peft_export.json"
    (["info", "{tmp}/missing", "--json"], r"Export folder not found: .*missing$"),
    (["serve", "{tmp}/missing"], r"Export folder not found: .*missing$"),
    (["bench", "{tmp}/missing", "--quick"], r"Export folder not found: .*missing$"),
    (["merge-onnx", "{tmp}/no/such/model", "-o", "{tmp}/out"], r"No folder at"),
    (["merge-onnx", "{adapter}", "-o", "{tmp}/out", "--pooling", "median"], r"--pooling 'median' is not one of"),
])
def test_errors_exit_2_with_one_line(argv, message, tmp_path, bert_case, capsys):
    argv = [a.format(tmp=tmp_path, adapter=bert_case.adapter) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "peft-export" in line]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1]
    assert lines[0].startswith("peft-export: error: ")
    assert re.search(message, lines[0])


def test_existing_output_from_the_cli(cli_export, bert_case, capsys):
    out = cli_export[2]
    assert main(["merge-onnx", str(bert_case.adapter), "-o", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err


def _subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(sub.choices)


def test_the_issue_subcommands_exist():
    assert {"merge-onnx", "encode", "info"} <= set(_subcommands())


@pytest.mark.parametrize("command", _subcommands())
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith(f"usage: peft-export {command}")
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in sub.choices[command]._actions:
        for flag in action.option_strings:
            assert flag in stdout
        if action.help and action.help != argparse.SUPPRESS and not action.option_strings:
            assert action.dest in stdout or (action.metavar or "") in stdout


def test_merge_onnx_help_documents_the_issue_options(capsys):
    with pytest.raises(SystemExit):
        main(["merge-onnx", "--help"])
    stdout = capsys.readouterr().out
    for flag in ("--adapter", "--force", "--opset", "--max-seq-length", "--revision", "--base", "-o"):
        assert flag in stdout


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    stdout = capsys.readouterr().out
    for command in _subcommands():
        assert command in stdout


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["merge-onnx", "--no-such-option"])
    assert info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("peft-export")
    if not script.exists():
        pytest.skip("peft-export console script not installed in this environment")
    result = subprocess.run([str(script), "info", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: peft-export info")
