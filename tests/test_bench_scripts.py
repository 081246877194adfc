"""Every benchmark and script parses its arguments with only the package's harness to import, none reaches into
tests/ or sys.path, and the harness's child runner and server lifecycle report what happened."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("benchmarks/investigations/*.py"),
                  *ROOT.glob("scripts/*.py")])
IMPORTS_TESTS = re.compile(r"^\s*(from|import)\s+(tests|fixtures|conftest)\b|(tests|fixtures)\.(tiny|family|text)",
                           re.MULTILINE)


def test_every_script_is_found():
    names = {p.name for p in SCRIPTS}
    assert {"bench_suite.py", "bench_serve.py", "bench_spinning.py", "family_parity.py"} <= names
    assert len(SCRIPTS) >= 20


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_imports_and_prints_its_help(script, monkeypatch, capsys):
    """Runs the script as ``python SCRIPT --help`` would, in this process: a broken import fails here."""
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_neither_edits_sys_path_nor_imports_tests(script):
    text = script.read_text()
    assert "sys.path" not in text, f"{script.name}: shared code goes in peft_export/bench/, not on sys.path"
    assert not IMPORTS_TESTS.search(text), f"{script.name} imports from tests/"


def test_the_old_harness_package_is_gone():
    assert not (ROOT / "peft_export" / "benchmark").exists()
    assert not any("peft_export.benchmark." in p.read_text() for p in SCRIPTS)


def test_child_runner_reports_the_peak_memory_exit_code_and_output():
    from peft_export.bench.child import must_succeed, run_child

    # 200 MB written then freed: the kernel's high-water mark keeps the peak although the child ends small.
    code = "import sys, time; b = b'x' * (200 * 2**20); del b; time.sleep(0.3); print('done'); sys.exit(3)"
    result = run_child([sys.executable, "-c", code])
    assert result["rc"] == 3 and result["stdout"].strip() == "done"
    assert result["peak_rss_mb"] >= 200
    with pytest.raises(SystemExit, match=r"allocating failed \(exit 3\)"):
        must_succeed(result, "allocating")


def test_child_runner_counts_the_memory_of_grandchildren():
    from peft_export.bench.child import run_child

    # Two processes of 150 MB each, alive at the same time for a second: the tree's peak is their sum.
    code = ("import subprocess, sys, time\n"
            "hold = 'b = bytes(1) * (150 * 2**20); import time; time.sleep(1.5)'\n"
            "p = subprocess.Popen([sys.executable, '-c', hold])\n"
            "b = bytes(1) * (150 * 2**20); time.sleep(1.5); p.wait()\n")
    result = run_child([sys.executable, "-c", code])
    assert result["rc"] == 0
    assert result["peak_rss_mb"] >= 290


def test_server_start_reports_a_server_that_exits_before_it_is_ready(tmp_path):
    from peft_export.bench.server import start_serve, stop, wait_ready

    server = start_serve(tmp_path / "no-such-export", [], tmp_path / "serve.log")
    try:
        with pytest.raises(RuntimeError, match=r"server exited with status 2 before it answered http://127\.0\.0\.1"):
            wait_ready(server.url, server.process, timeout=60)
    finally:
        stop(server.process)
    assert "no-such-export" in (tmp_path / "serve.log").read_text()


def test_percentiles_of_no_samples_are_nan_not_an_error():
    from peft_export.bench.stats import percentiles

    empty = percentiles([])
    assert empty["n"] == 0 and empty["p99_ms"] != empty["p99_ms"]
    assert percentiles([0.001, 0.003])["p50_ms"] == pytest.approx(2.0)


def test_corpus_texts_are_distinct_past_one_cycle_of_the_pool():
    from peft_export.bench.texts import distinct_pool, distinct_texts

    n = len(distinct_pool()) + 50
    texts = distinct_texts(n)
    assert len(set(texts)) == n


def test_rerank_passages_are_real_distinct_and_hold_the_query_s_own():
    from peft_export.bench.texts import rerank_query_and_passages
    from peft_export.demo import load_pairs

    query, passages = rerank_query_and_passages(100)
    own = load_pairs("eval")[0]
    assert query == own["query"] and len(passages) == len(set(passages)) == 100
    assert passages.index(own["passage"]) == 33 and all(len(p.split()) >= 3 for p in passages)
    with pytest.raises(ValueError, match=r"n must be in 1\.\.500, found 0"):
        rerank_query_and_passages(0)
