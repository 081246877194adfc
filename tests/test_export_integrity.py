"""Issue 18, export folders and adapters (items 1-3, 5, 6, 8, 13): changes to an export are atomic as a whole, every
file is what the manifest recorded, a loaded model never mixes in files written after it loaded, paths are confined
by what is written (hub-cache symlinks load), config values are checked against the graph, leftovers of dead runs are
removed at once, and NaN/Inf is never returned as an embedding. Faults come from outside: a process killed at a
named moment (PEFT_EXPORT_CRASH_AT), a full or read-only disk, tampered files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fixtures.export_edits import rehash, uncovered, write_runtime_config
from switchable_fixtures import (TEXTS, base_model, copy_export, make_adapter, max_unit_diff, quiet, snapshot,
                                 switchable_export)

from peft_export import ConfigError, EmbeddingModel, NonFiniteEmbeddingError, PeftExportError, UnsafeModelError
from peft_export.cli import main as cli_main
from peft_export.export.output_folder import clean_dead_temporaries
from peft_export.export.tokenizer_files import save_tokenizer
from peft_export.export.switchable_folder import remove_adapter

REPO = Path(__file__).resolve().parents[1]
TMP_PREFIX = ".peft-export-tmp-"
LATE = dict(r=3, lora_alpha=6, target_modules=["query", "dense"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def _edit_entry(folder: Path, name: str, **changes) -> None:
    """Change adapter ``name``'s manifest entry and re-record its file's hash, as a careful attacker would."""
    manifest = _json(folder / "peft_export.json")
    entry = next(e for e in manifest["adapters"] if e["name"] == name)
    entry.update(changes)
    entry["file_sha256"] = _sha(folder / entry["file"])
    _write_json(folder / "peft_export.json", manifest)


@pytest.fixture
def export(tmp_path) -> Path:
    return copy_export(switchable_export(), tmp_path / "export")


@pytest.fixture(scope="module")
def loaded() -> EmbeddingModel:
    return EmbeddingModel(switchable_export())


def _kill_env(point: str) -> dict[str, str]:
    return {**os.environ, "PEFT_EXPORT_CRASH_AT": point, "PYTHONPATH": str(REPO)}


# ----- item 1: an adapter's file is what the manifest says; add/remove switch with one rename -----

def test_adapter_file_holding_another_adapter_is_refused_by_name(export):
    # The torn state of the issue: the file of 'attn' holds another adapter that fits the graph just as well.
    shutil.copy(export / "adapters" / "ffn.onnx_adapter", export / "adapters" / "attn.onnx_adapter")
    with pytest.raises(ConfigError, match=r"adapters/attn.onnx_adapter does not hold what peft_export.json records "
                                          r"for adapter 'attn': sha256 [0-9a-f]{16}\.\.\. instead of"):
        EmbeddingModel(export)


def test_graph_file_that_does_not_match_its_hash_is_refused(export):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(export / "model.onnx"))
    tensor = next(t for t in graph.graph.initializer if t.name.endswith("LayerNorm.weight"))
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 2, tensor.name))
    onnx.save(graph, str(export / "model.onnx"))
    with pytest.raises(ConfigError, match="model.onnx does not hold what peft_export.json records for "
                                          "model.onnx"):
        EmbeddingModel(export)


def _new_adapter_embeddings(export: Path, late: Path) -> np.ndarray:
    fresh = EmbeddingModel(export)
    fresh.load_adapter(str(late), adapter_name="late")  # converted on the fly: what add-adapter writes
    return fresh.encode(TEXTS, adapter="late")


@pytest.mark.slow
@pytest.mark.parametrize("point, expect", [("add-adapter-file-written", "old"), ("add-adapter-committed", "new")])
def test_kill_during_add_adapter_force_leaves_the_old_or_the_new_adapter(export, point, expect, loaded):
    late = make_adapter("late", **LATE)
    old = loaded.encode(TEXTS, adapter="attn")
    new = _new_adapter_embeddings(export, late)
    result = subprocess.run([sys.executable, "-m", "peft_export.cli", "add-adapter", str(export), f"attn={late}",
                             "--force"], env=_kill_env(point), capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    model = EmbeddingModel(export)  # loads: every listed file matches its hash
    assert model.list_adapters() == ["attn", "ffn", "mixed"]
    assert max_unit_diff(model.encode(TEXTS, adapter="attn"), old if expect == "old" else new) <= 1e-6
    manifest = _json(export / "peft_export.json")
    assert "adapters" not in _json(export / "embedding_config.json")  # one list: the manifest's
    listed = sorted(Path(e["file"]).name for e in manifest["adapters"])
    assert all(_sha(export / e["file"]) == e["file_sha256"] for e in manifest["adapters"])
    assert len(list((export / "adapters").iterdir())) == 4  # the file no entry lists (new or replaced) is left
    remove_adapter(export, "ffn", log=quiet)  # the next change removes it
    assert sorted(p.name for p in (export / "adapters").iterdir()) == [n for n in listed if not n.startswith("ffn")]


def test_kill_during_remove_adapter_leaves_the_new_set(export):
    result = subprocess.run([sys.executable, "-m", "peft_export.cli", "remove-adapter", str(export), "ffn"],
                            env=_kill_env("remove-adapter-committed"), capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert EmbeddingModel(export).list_adapters() == ["attn", "mixed"]
    assert "adapters" not in _json(export / "embedding_config.json")
    remove_adapter(export, "mixed", log=quiet)  # the next change removes the file the killed one left
    assert sorted(p.name for p in (export / "adapters").iterdir()) == ["attn.onnx_adapter"]


def _fail_manifest_fsync(monkeypatch, code: int) -> None:
    """Fail the flush of peft_export.json's temporary file (a full or read-only disk at the commit)."""
    import peft_export.runtime.atomic_file as atomic_file

    real = os.fsync

    def fsync(fd):
        if ".peft_export.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(atomic_file.os, "fsync", fsync)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_full_disk_during_add_adapter_is_one_error_and_changes_nothing(export, monkeypatch, capsys):
    before = snapshot(export)
    _fail_manifest_fsync(monkeypatch, errno.ENOSPC)
    late = make_adapter("late", **LATE)
    assert cli_main(["add-adapter", str(export), f"late={late}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"peft-export: error: Adding adapter 'late' to {export} failed: No space "
                                            "left on device; the export was not changed")
    assert snapshot(export) == before  # no listed-but-missing adapter, no peft_export.json.tmp
    assert EmbeddingModel(export).list_adapters() == ["attn", "ffn", "mixed"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_read_only_export_gives_one_error_for_add_and_remove(export, monkeypatch, capsys):
    before = snapshot(export)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(export)) and
                        mode == os.W_OK else real_access(p, mode, **kw))
    for args in (["add-adapter", str(export), f"late={make_adapter('late', **LATE)}"],
                 ["remove-adapter", str(export), "ffn"]):
        assert cli_main(args) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"peft-export: error: {export} is not writable (read-only file system or permissions); the export was "
            "not changed")
    monkeypatch.undo()
    _fail_manifest_fsync(monkeypatch, errno.EROFS)  # read-only at the moment of the switch
    with pytest.raises(PeftExportError, match="Removing adapter 'ffn' from .* failed: Read-only file system; the "
                                              "export was not changed"):
        remove_adapter(export, "ffn", log=quiet)
    assert snapshot(export) == before


# ----- items 2 and 8: --force swaps whole folders; a dead run's temporary folders go at once -----

_EXPORT_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from peft_export.export import output_folder as artifact
    target, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "no-exchange":
        artifact.exchange_folders = lambda a, b: False
    with artifact.atomic_output_folder(target, force=True) as tmp:
        (tmp / "payload.bin").write_bytes(b"new" * 1000)
        (tmp / "peft_export.json").write_text(
            '{"format": "peft_export", "version": "new", "export": {"sha256": {"payload.bin": ""}}}')
        if mode == "hold":
            print(tmp, flush=True)
            time.sleep(120)
""")


def _old_export(tmp_path: Path) -> Path:
    target = tmp_path / "out"
    target.mkdir()
    (target / "payload.bin").write_bytes(b"old" * 1000)
    (target / "peft_export.json").write_text(
        '{"format": "peft_export", "version": "old", "export": {"sha256": {"payload.bin": ""}}}')
    return target


def _version(target: Path) -> str:
    version = _json(target / "peft_export.json")["version"]
    assert (target / "payload.bin").read_bytes() == version.encode() * 1000  # complete, never a mix
    return version


def _run_export(target: Path, mode: str = "exchange", point: str | None = None) -> subprocess.CompletedProcess:
    env = _kill_env(point) if point else {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", _EXPORT_SCRIPT, str(target), mode], env=env, capture_output=True,
                          text=True, timeout=120)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(TMP_PREFIX))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
@pytest.mark.parametrize("point, expect", [("export-before-switch", "old"), ("export-swapped", "new")])
def test_kill_during_force_leaves_the_old_or_the_new_export(tmp_path, point, expect):
    target = _old_export(tmp_path)
    result = _run_export(target, point=point)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert _version(target) == expect
    assert _leftovers(tmp_path)  # the dead run's folder (the new export, or the old one after the swap) ...
    assert _run_export(target).returncode == 0  # ... goes with the next export, at once, not after an hour
    assert _version(target) == "new" and _leftovers(tmp_path) == []


def test_without_folder_exchange_a_kill_between_renames_is_put_back(tmp_path):
    target = _old_export(tmp_path)
    result = _run_export(target, mode="no-exchange", point="export-old-aside")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not target.exists()  # the one moment this fallback leaves nothing at the path ...
    other = tmp_path / "other"
    assert _run_export(other, mode="no-exchange").returncode == 0  # ... which the next export beside it repairs
    assert _version(target) == "old" and _version(other) == "new" and _leftovers(tmp_path) == []
    assert _run_export(target, mode="no-exchange").returncode == 0
    assert _version(target) == "new" and _leftovers(tmp_path) == []


def test_temporary_folders_of_live_runs_are_kept_and_of_dead_runs_removed(tmp_path):
    target = _old_export(tmp_path)
    process = subprocess.Popen([sys.executable, "-c", _EXPORT_SCRIPT, str(target), "hold"], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        building = Path(process.stdout.readline().strip())
        assert building.is_dir()
        clean_dead_temporaries(tmp_path)
        assert building.is_dir()  # its owner is alive
    finally:
        process.kill()
        process.wait(timeout=30)
    assert _leftovers(tmp_path)
    clean_dead_temporaries(tmp_path)  # seconds old, but its owner is dead
    assert _leftovers(tmp_path) == [] and _version(target) == "old"


def test_add_and_remove_clean_what_dead_changes_left(export):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    adapters = export / "adapters"
    leftovers = [adapters / f".attn.onnx_adapter.{dead.pid}.candidate", adapters / "stray.onnx_adapter",
                 adapters / ".ffn.onnx_adapter.x1y2.tmp", export / "peft_export.json.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    live = adapters / f".mixed.onnx_adapter.{os.getpid()}.candidate"
    live.write_bytes(b"in progress")
    remove_adapter(export, "ffn", log=quiet)
    assert [p for p in leftovers if p.exists()] == [] and live.exists()
    assert sorted(p.name for p in adapters.iterdir()) == sorted([live.name, "attn.onnx_adapter",
                                                                 "mixed.onnx_adapter"])


def test_exported_tokenizer_config_drops_remote_code_pointers(tmp_path):
    class Tokenizer:
        def save_pretrained(self, folder):
            _write_json(Path(folder) / "tokenizer_config.json", {
                "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "model_max_length": 128})

    save_tokenizer(Tokenizer(), tmp_path)
    assert _json(tmp_path / "tokenizer_config.json") == {"model_max_length": 128}


# ----- item 3: a loaded model reads each file once -----

def test_merge_adapter_after_the_export_is_replaced_uses_what_was_loaded(export):
    import onnx
    from onnx import numpy_helper

    model = EmbeddingModel(export)
    before = model.encode(TEXTS, adapter="attn")
    state = model.get_adapter_state_dict("attn")
    # Another export takes the path, file by file through renames as an export --force does (whole folders there).
    graph = onnx.load(str(export / "model.onnx"))
    for tensor in graph.graph.initializer:
        if tensor.name.endswith("LayerNorm.weight"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 3, tensor.name))
    onnx.save(graph, str(export / "next.onnx"))
    os.replace(export / "next.onnx", export / "model.onnx")
    shutil.copy(export / "adapters" / "ffn.onnx_adapter", export / "next.onnx_adapter")
    os.replace(export / "next.onnx_adapter", export / "adapters" / "attn.onnx_adapter")
    model.merge_adapter("attn")
    assert model.merged_adapters() == ["attn"]
    assert max_unit_diff(model.encode(TEXTS, adapter="attn"), before) <= 1e-5
    after = model.get_adapter_state_dict("attn")
    assert sorted(after) == sorted(state) and all(np.array_equal(after[k], state[k]) for k in state)


# ----- item 5: paths confined by what is written; hub-cache snapshots load -----

def _as_hub_snapshot(folder: Path, root: Path) -> Path:
    """``folder`` laid out as the Hugging Face cache does: every file a relative symlink into blobs/."""
    blobs, snap = root / "blobs", root / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = blobs / _sha(path)
        shutil.copy(path, blob)
        link = snap / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snap


def test_export_and_adapter_in_a_hub_cache_snapshot_load(export, tmp_path, loaded):
    import onnx

    # With external data, as exports over 2 GiB have it; the manifest records both graph files.
    onnx.save_model(onnx.load(str(export / "model.onnx")), str(export / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    manifest = _json(export / "peft_export.json")
    manifest["export"]["sha256"].update({name: _sha(export / name) for name in ("model.onnx", "model.onnx_data")})
    _write_json(export / "peft_export.json", manifest)
    snap = _as_hub_snapshot(export, tmp_path / "hub" / "models--me--export")
    assert (snap / "model.onnx_data").is_symlink() and (snap / "adapters" / "attn.onnx_adapter").is_symlink()
    model = EmbeddingModel(snap)
    for name in ("attn", "ffn", "mixed", False):
        assert max_unit_diff(model.encode(TEXTS, adapter=name), loaded.encode(TEXTS, adapter=name)) <= 1e-6
    late = make_adapter("late", **LATE)
    hub_late = _as_hub_snapshot(late, tmp_path / "hub" / "models--me--late")
    model.load_adapter(str(hub_late), adapter_name="hub-late")
    model.load_adapter(str(late), adapter_name="plain-late")
    assert max_unit_diff(model.encode(TEXTS, adapter="hub-late"), model.encode(TEXTS, adapter="plain-late")) == 0


@pytest.mark.parametrize("model_file", ["../elsewhere/model.onnx", "/tmp/model.onnx", "C:\\\\model.onnx", ""])
def test_model_file_outside_the_folder_is_refused(export, tmp_path, model_file):
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(export / "model.onnx", tmp_path / "elsewhere" / "model.onnx")
    config = _json(export / "embedding_config.json")
    config["model_file"] = model_file
    write_runtime_config(export, config)
    with pytest.raises(UnsafeModelError, match="embedding_config.json's model_file"):
        EmbeddingModel(export)


def test_weights_that_are_not_safetensors_are_one_clear_error(tmp_path):
    from peft_export import export_onnx_model

    base = shutil.copytree(base_model(), tmp_path / "base")
    (base / "model.safetensors").unlink()
    os.symlink("/etc/passwd", base / "model.safetensors")
    with pytest.raises(ConfigError, match=r"model.safetensors \(model weights\) is not a valid safetensors file: its "
                                          r"header claims \d+ bytes but the file has \d+"):
        export_onnx_model(str(base), tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


# ----- item 6: the runtime config is checked against the graph at load -----

@pytest.mark.parametrize("key, value, message", [
    ("max_seq_length", 0, "max_seq_length must be a positive integer, found 0"),
    ("max_seq_length", -1, "max_seq_length must be a positive integer, found -1"),
    ("max_seq_length", "abc", "max_seq_length must be a positive integer, found 'abc'"),
    ("max_seq_length", 1000, "max_seq_length 1000 exceeds the graph's 128 positions"),
    ("max_seq_length", 10**9, "max_seq_length 1000000000 exceeds the graph's 128 positions"),
    ("dimension", 7, "dimension is 7 but the graph's sentence_embedding has 32 values"),
    ("dimension", "32", "dimension must be a positive integer, found '32'"),
])
def test_config_values_are_checked_against_the_graph(export, key, value, message):
    config = _json(export / "embedding_config.json")
    config[key] = value
    write_runtime_config(export, config)
    with pytest.raises(ConfigError, match=message):
        EmbeddingModel(export)


def test_exports_without_recorded_positions_are_held_to_their_exported_length(export):
    config = _json(export / "embedding_config.json")
    del config["max_positions"]
    config["max_seq_length"] = 512
    write_runtime_config(export, config)
    with pytest.raises(ConfigError, match="max_seq_length 512 exceeds the 48 tokens this graph was exported"):
        EmbeddingModel(export)


# ----- item 13: NaN/Inf is never an embedding -----

@pytest.fixture
def overflowing(export) -> Path:
    """Adapter 'attn' with finite but huge weights (a broken adapter whose hash was recorded with it)."""
    from peft_export.runtime.onnxruntime_adapters import read_adapter_arrays, write_adapter_file

    path = export / "adapters" / "attn.onnx_adapter"
    arrays = read_adapter_arrays(path)
    write_adapter_file(path, {k: v * 1e30 if k.endswith("lora_B") else v for k, v in arrays.items()})
    _edit_entry(export, "attn")
    return export


def test_encode_refuses_non_finite_outputs_naming_the_adapter(overflowing):
    model = EmbeddingModel(overflowing)
    with pytest.raises(NonFiniteEmbeddingError, match=r"with adapter 'attn' produced NaN or Inf for 8 of 8 inputs"):
        model.encode(TEXTS, adapter="attn")
    model.set_adapter("attn")
    with pytest.raises(NonFiniteEmbeddingError, match="adapter 'attn'"):
        model.encode(TEXTS[:2], output_value="token_embeddings")
    assert np.isfinite(model.encode(TEXTS, adapter="ffn")).all()


def test_server_never_serves_non_finite_vectors(overflowing):
    import httpx
    from serve_support import serving, wait_until

    model = EmbeddingModel(overflowing)
    with serving(model, ready=False) as srv:
        wait_until(lambda: srv.app.state.server.status != "warming_up", what="warm-up over")
        health = httpx.get(srv.url + "/health", timeout=10)
    assert health.status_code == 503 and "NaN or Inf" in health.json()["status"]
    with serving(model, ready=False, warmup=False) as srv:
        wait_until(lambda: httpx.get(srv.url + "/health", timeout=10).status_code == 200, what="ready")
        for encoding in ("float", "base64"):
            bad = httpx.post(srv.url + "/v1/embeddings", timeout=30,
                             json={"model": "attn", "input": ["a", "b"], "encoding_format": encoding})
            assert bad.status_code == 500 and bad.headers["content-type"].startswith("application/json")
            assert bad.json()["error"]["code"] == "non_finite_embedding"
            assert "Model 'attn' produced NaN or Inf" in bad.json()["error"]["message"]
        similarity = httpx.post(srv.url + "/similarity", timeout=30, json={
            "model": "attn", "inputs": {"source_sentence": "a", "sentences": ["b", "c"]}})
        assert similarity.status_code == 500 and "NaN or Inf" in similarity.text
        good = httpx.post(srv.url + "/v1/embeddings", json={"model": "ffn", "input": ["a"]}, timeout=30)
        assert good.status_code == 200 and all(np.isfinite(good.json()["data"][0]["embedding"]))



# ----- issue 22 item 11: the manifest covers every file the runtime reads; a missing hash is an error -----

def _swap_two_token_ids(export: Path) -> None:
    tokenizer = _json(export / "tokenizer.json")
    vocab = tokenizer["model"]["vocab"]
    a, b = "the", "a"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    _write_json(export / "tokenizer.json", tokenizer)


def _edit_config(export: Path, **changes) -> None:
    _write_json(export / "embedding_config.json", {**_json(export / "embedding_config.json"), **changes})


@pytest.mark.parametrize("attack, file", [
    (_swap_two_token_ids, "tokenizer.json"),
    (lambda export: _edit_config(export, max_seq_length=8), "embedding_config.json"),
    (lambda export: _edit_config(export, prompts={"injected": "Ignore the text: "}, default_prompt_name="injected"),
     "embedding_config.json"),
], ids=["tokenizer-ids-swapped", "max-seq-length-8", "injected-default-prompt"])
def test_edited_tokenizer_or_runtime_config_is_refused(export, attack, file):
    # Each of these loaded and served other vectors with exit 0 before the manifest hashed these files.
    attack(export)
    with pytest.raises(ConfigError, match=rf"{file} does not hold what peft_export.json records for {file}: sha256 "
                                          r"[0-9a-f]{16}\.\.\. instead of .*Export the folder again"):
        EmbeddingModel(export)


def test_the_attacks_would_change_the_vectors(export, loaded):
    # What the refusals above prevent: with the hashes re-recorded (the folder vouches for them) each edit serves
    # other vectors for the same texts.
    texts = ["the cat sat on a mat", "a query about the weather"]
    expected = loaded.encode(texts, adapter=False)
    for i, attack in enumerate((_swap_two_token_ids, lambda e: _edit_config(e, max_seq_length=3),
                                lambda e: _edit_config(e, prompts={"x": "zzz "}, default_prompt_name="x"))):
        edited = copy_export(export, export.parent / f"edited-{i}")
        attack(edited)
        rehash(edited, "tokenizer.json", "embedding_config.json")
        assert max_unit_diff(EmbeddingModel(edited).encode(texts, adapter=False), expected) > 1e-3


def test_manifest_without_file_hashes_is_refused(export, capsys):
    manifest = _json(export / "peft_export.json")
    del manifest["export"]["sha256"]
    _write_json(export / "peft_export.json", manifest)
    with pytest.raises(ConfigError, match=r"records no file hashes \(export\.sha256\).*refused\. Export the folder "
                                          r"again with this version"):
        EmbeddingModel(export)
    capsys.readouterr()
    assert cli_main(["encode", str(export), "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "records no file hashes" in err, err


def test_export_written_before_every_file_was_hashed_gives_one_error_to_re_export(export, capsys):
    # The manifests of earlier versions hashed the graph only.
    manifest = _json(export / "peft_export.json")
    manifest["export"]["sha256"] = {"model.onnx": manifest["export"]["sha256"]["model.onnx"]}
    _write_json(export / "peft_export.json", manifest)
    message = (r"records no sha256 for embedding_config\.json, which the runtime reads; refused\. Export the folder "
               r"again with this version of peft_export \(earlier versions hashed only the graph and adapters")
    with pytest.raises(ConfigError, match=message):
        EmbeddingModel(export)
    for command in (["encode", str(export), "hello"], ["info", str(export)],
                    ["add-adapter", str(export), f"late={make_adapter('late', **LATE)}"], ["remove-adapter",
                                                                                          str(export), "ffn"]):
        capsys.readouterr()
        assert cli_main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Export the folder again" in err, (command, err)
    # Only the runtime config listed: the tokenizer is the next file without a hash.
    manifest["export"]["sha256"]["embedding_config.json"] = _sha(export / "embedding_config.json")
    _write_json(export / "peft_export.json", manifest)
    with pytest.raises(ConfigError, match=r"records no sha256 for tokenizer\.json"):
        EmbeddingModel(export)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# The files of the switchable test export (test_every_file_the_runtime_opens_is_covered_by_the_manifest checks the
# list is complete).
EXPORT_FILES = ["embedding_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json",
                "adapters/attn.onnx_adapter", "adapters/ffn.onnx_adapter", "adapters/mixed.onnx_adapter"]


@pytest.mark.parametrize("name", EXPORT_FILES)
def test_one_flipped_byte_in_any_file_of_the_export_is_refused(export, name):
    # Graph and adapter bytes were already refused (held); the tokenizer files and runtime config now are too.
    _flip_byte(export / name)
    with pytest.raises(ConfigError, match=rf"{name} does not hold what peft_export.json records"):
        model = EmbeddingModel(export)
        model.encode(TEXTS, adapter=Path(name).stem if name.startswith("adapters/") else False)


def test_every_file_the_runtime_opens_is_covered_by_the_manifest(export):
    # Every file the export holds has its hash in the manifest, and every file the runtime opens from Python while
    # loading and encoding with each adapter is one of them (native opens, the ONNX graph's, are checked by the
    # listing: a hashed graph names its external data).
    assert uncovered(export) == []
    assert sorted(p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()) == sorted(
        [*EXPORT_FILES, "peft_export.json"])
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        folder = Path({str(export)!r}).resolve()
        opened = set()
        def hook(event, args):
            if event == "open" and isinstance(args[0], (str, bytes, Path)):
                path = Path(args[0] if not isinstance(args[0], bytes) else args[0].decode()).resolve()
                if folder in path.parents:
                    opened.add(path.relative_to(folder).as_posix())
        sys.addaudithook(hook)
        from peft_export import EmbeddingModel
        model = EmbeddingModel(folder)
        for adapter in [False, *model.list_adapters()]:
            model.encode(["a text"], adapter=adapter)
        print(json.dumps(sorted(opened)))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    opened = set(json.loads(result.stdout.strip().splitlines()[-1]))
    manifest = _json(export / "peft_export.json")
    covered = set(manifest["export"]["sha256"]) | {e["file"] for e in manifest["adapters"]} | {"peft_export.json"}
    assert {"embedding_config.json", "tokenizer.json", "adapters/attn.onnx_adapter"} <= opened
    assert opened <= covered, opened - covered
