"""Export faults (RELIABILITY items 3-5 and 46): existing output, --force (which replaces an earlier export and
nothing else), validation failures, unwritable or full targets, atomic writes and kill -9, and adapters that change
nothing."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SENTENCE_ATOL, max_unit_diff
from peft_export.runtime.onnxruntime_backend import OnnxRuntimeBackend as _RealBackend
from peft_export import (
    ConfigError,
    EmbeddingModel,
    OutputExistsError,
    PeftExportError,
    ValidationError,
    export_onnx_model,
)
from peft_export.cli import main

TMP_PREFIX = ".peft-export-tmp-"


def _quiet(msg: str) -> None:
    return None


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(TMP_PREFIX))


@pytest.fixture
def existing_output(bert_case, tmp_path) -> Path:
    """A previous export the user cares about (of the tiny BERT's base: the tests export its adapter over it)."""
    out = tmp_path / "out"
    shutil.copytree(bert_case.export, out)
    return out


def test_existing_output_is_refused_and_left_untouched(bert_case, existing_output):
    before = _snapshot(existing_output)
    with pytest.raises(OutputExistsError, match=r"already exists; pass force=True"):
        export_onnx_model(str(bert_case.adapter), existing_output, log=_quiet)
    assert _snapshot(existing_output) == before
    assert _leftovers(existing_output.parent) == []


def test_force_replaces_the_existing_output(bert_case, bert_model, existing_output, real_texts):
    before = (existing_output / "peft_export.json").read_bytes()
    result = export_onnx_model(str(bert_case.adapter), existing_output, force=True, log=_quiet)
    assert result.path == existing_output
    assert (existing_output / "peft_export.json").read_bytes() != before
    texts = real_texts[:10]
    np.testing.assert_allclose(EmbeddingModel(existing_output).encode(texts), bert_model.encode(texts), atol=1e-6)
    assert _leftovers(existing_output.parent) == []


@pytest.mark.parametrize("user_file", ["keep.txt", ".env", "adapters/notes.md"])
def test_force_never_replaces_a_folder_holding_files_no_export_wrote(bert_case, existing_output, tmp_path, user_file):
    """RELIABILITY 46: --force replaces an earlier export, recognised by its manifest, and nothing else: a file the
    user put beside an export's files (dotfiles included), or a folder that is no export at all, is left whole."""
    (existing_output / user_file).parent.mkdir(exist_ok=True)
    (existing_output / user_file).write_text("the user's")
    plain = tmp_path / "documents"
    plain.mkdir()
    (plain / user_file.rsplit("/", 1)[-1]).write_text("the user's")
    for target, shown in ((existing_output, user_file), (plain, user_file.rsplit("/", 1)[-1])):
        before = _snapshot(target)
        with pytest.raises(OutputExistsError, match=rf"{target} holds files that no export wrote \({re.escape(shown)}"
                                                    r"\); not replacing it even with force=True"):
            export_onnx_model(str(bert_case.adapter), target, force=True, log=_quiet)
        assert _snapshot(target) == before
    assert _leftovers(tmp_path) == []


def test_force_with_the_input_as_output_leaves_the_input(reranker, tmp_path, capsys):
    """`merge-onnx ADAPTER -o ADAPTER --force` (or -o the folder holding the models) used to export and then delete
    the adapter folder, replaced by the export."""
    adapter = tmp_path / "models" / "adapter"
    shutil.copytree(reranker["adapter"], adapter)
    for output in (adapter, adapter.parent):
        before = _snapshot(adapter)
        assert main(["merge-onnx", str(adapter), "--base", str(reranker["base"]), "-o", str(output), "--force"]) == 2
        err = capsys.readouterr().err
        assert f"{output} holds files that no export wrote" in err and "even with --force" in err
        assert _snapshot(adapter) == before


def test_output_path_that_is_a_file_is_refused(bert_case, tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(OutputExistsError, match=r"exists and is not a folder"):
        export_onnx_model(str(bert_case.adapter), target, force=True, log=_quiet)
    assert target.read_text() == "not a folder"


class _CorruptedBackend:
    """Stands in for the ONNX Runtime backend used by validation and returns slightly wrong numbers."""

    def __init__(self, model_path, *args, **kwargs):
        self._real = _RealBackend(model_path, *args, **kwargs)

    def run(self, feeds, outputs=None):
        result = self._real.run(feeds, outputs)
        return {name: value + 1e-2 * np.sign(value) for name, value in result.items()}


@pytest.fixture
def corrupted_graph_runner(monkeypatch):
    import peft_export.runtime.onnxruntime_backend as backend_module

    # The ONNX stage imports the backend class when it validates, so patch it where it is defined.
    monkeypatch.setattr(backend_module, "OnnxRuntimeBackend", _CorruptedBackend)


def test_validation_failure_names_max_diffs_and_writes_nothing(bert_case, tmp_path, corrupted_graph_runner):
    out = tmp_path / "out"
    with pytest.raises(ValidationError) as info:
        export_onnx_model(str(bert_case.adapter), out, log=_quiet)
    message = str(info.value)
    assert message.startswith("The exported ONNX graph does not match the PyTorch reference")
    assert "sentence_embedding: max abs diff" in message and "> 1e-05" in message
    assert "token_embeddings: max abs diff" in message and "> 0.0001" in message
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_validation_failure_with_force_keeps_the_previous_export(bert_case, existing_output, corrupted_graph_runner):
    before = _snapshot(existing_output)
    with pytest.raises(ValidationError):
        export_onnx_model(str(bert_case.adapter), existing_output, force=True, log=_quiet)
    assert _snapshot(existing_output) == before
    assert _leftovers(existing_output.parent) == []


def test_impossible_tolerance_fails_validation(bert_case, tmp_path, monkeypatch):
    from dataclasses import replace

    from peft_export.tasks import EMBEDDING, TASKS

    impossible = tuple(replace(output, tolerance=-1.0) for output in EMBEDDING.outputs)
    monkeypatch.setitem(TASKS, "embedding", replace(EMBEDDING, outputs=impossible))
    with pytest.raises(ValidationError, match=r"sentence_embedding: max abs diff [0-9.e+-]+ > -1; "
                                              r"token_embeddings: max abs diff [0-9.e+-]+ > -1"):
        export_onnx_model(str(bert_case.adapter), tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_validation_failure_from_the_cli_exits_non_zero(bert_case, tmp_path, corrupted_graph_runner, capsys):
    out = tmp_path / "out"
    code = main(["merge-onnx", str(bert_case.adapter), "-o", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # transformers may draw its weight-loading progress bar on stderr first; the error itself is one last line.
    lines = err.strip().splitlines()
    assert sum("peft-export: error:" in line for line in lines) == 1
    assert lines[-1].startswith("peft-export: error: The exported ONNX graph does not match")
    assert "sentence_embedding: max abs diff" in lines[-1]
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_unwritable_parent_gives_a_clean_error(bert_case, tmp_path):
    parent = tmp_path / "not-a-folder"
    parent.write_text("x")
    with pytest.raises(PeftExportError, match=r"Cannot write to .*not-a-folder"):
        export_onnx_model(str(bert_case.adapter), parent / "out", log=_quiet)


def test_read_only_parent_gives_a_clean_error(bert_case, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running with privileges that ignore directory permissions (root)")
        with pytest.raises(PeftExportError, match=r"Cannot write to .*read-only.*Permission denied"):
            export_onnx_model(str(bert_case.adapter), parent / "out", log=_quiet)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_full_disk_while_writing_leaves_nothing(bert_case, tmp_path, monkeypatch):
    import peft_export.export.pipeline as pipeline

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pipeline, "write_json", disk_full)
    out = tmp_path / "out"
    with pytest.raises(PeftExportError, match=r"Writing .*out failed: No space left on device; nothing was written"):
        export_onnx_model(str(bert_case.adapter), out, log=_quiet)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_stale_temporary_folders_are_cleaned_and_fresh_ones_ignored(bert_case, tmp_path):
    stale = tmp_path / f"{TMP_PREFIX}out-stale"
    fresh = tmp_path / f"{TMP_PREFIX}out-fresh"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"half a file")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    export_onnx_model(str(bert_case.adapter), tmp_path / "out", log=_quiet)
    assert not stale.exists()
    assert fresh.exists()  # maybe another export's work in progress: left alone
    EmbeddingModel(tmp_path / "out")


def test_kill_9_during_export_leaves_no_output(bert_case, tmp_path):
    """A killed export leaves no folder at the target (at most an ignored temp folder); the next one succeeds."""
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "peft_export.cli", "merge-onnx", str(bert_case.adapter), "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not _leftovers(tmp_path) and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    if process.returncode != -signal.SIGKILL:
        pytest.skip("the export finished before it could be killed")
    assert not out.exists() or (out / "peft_export.json").is_file()
    if out.exists():  # killed after the rename: the folder must be complete and valid
        EmbeddingModel(out)
    export_onnx_model(str(bert_case.adapter), out, force=out.exists(), log=_quiet)
    EmbeddingModel(out)


# ---- adapters that change nothing; more than one adapter ----

@pytest.fixture
def noop_adapter(bert_case, tmp_path) -> Path:
    from safetensors.torch import load_file, save_file

    adapter = shutil.copytree(bert_case.adapter, tmp_path / "noop-adapter")
    path = adapter / "adapter_model.safetensors"
    tensors = {k: (v * 0 if ".lora_B." in k else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    return adapter


def test_noop_adapter_is_refused(noop_adapter, tmp_path):
    with pytest.raises(ConfigError, match=r"changes the normalised embeddings by at most 0 .*allow_noop_adapter=True"):
        export_onnx_model(str(noop_adapter), tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists()


def test_noop_adapter_exported_when_allowed(noop_adapter, bert_case, tmp_path, real_texts):
    result = export_onnx_model(str(noop_adapter), tmp_path / "out", allow_noop_adapter=True, log=_quiet)
    assert result.manifest["validation"]["adapter_vs_base_max_abs_diff"] == 0.0
    texts = real_texts[:10]
    base = bert_case.base_reference().encode(texts)
    assert max_unit_diff(EmbeddingModel(result.path).encode(texts), base) < SENTENCE_ATOL


def test_noop_adapter_from_the_cli(noop_adapter, tmp_path, capsys):
    assert main(["merge-onnx", str(noop_adapter), "-o", str(tmp_path / "out")]) == 2
    assert "--allow-noop-adapter" in capsys.readouterr().err
    assert main(["merge-onnx", str(noop_adapter), "-o", str(tmp_path / "out"), "--allow-noop-adapter"]) == 0


def test_two_adapters_in_one_merged_export_are_refused(bert_case, tmp_path):
    with pytest.raises(ConfigError, match=r"A merged export takes one adapter, 2 were given \(default, second\)"):
        export_onnx_model(str(bert_case.adapter), tmp_path / "out", adapters=[f"second={bert_case.adapter}"],
                          log=_quiet)
    assert not (tmp_path / "out").exists()
