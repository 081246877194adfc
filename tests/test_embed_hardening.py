"""`peft-export embed` under the attacks of issue 22: kills after the last part and during assembly, two jobs on one
output, `--force` on what embed did not write, tampered parts, OS errors, bad rows, one huge text, hostile CSV."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from test_embed import PART_ROWS, embed_corpus, expected, ids, inputs, read_parquet, run_cli, texts, write

from peft_export.cli import main
from peft_export.corpus.job import KILL_ENV
from peft_export.errors import InputError, OutputError, OutputExistsError, PeftExportError

pq = pytest.importorskip("pyarrow.parquet")
__all__ = ["expected", "ids", "inputs", "texts"]  # fixtures shared with test_embed


def vectors_of(path):
    return np.load(path) if str(path).endswith(".npy") else read_parquet(path)[1]


# ----- 1. resume always finishes; assembly is one rename -----
@pytest.mark.parametrize("output", ["out", "out.parquet", "out.npy"])
@pytest.mark.parametrize("kill_at", ["last", "assembly", "complete"])
def test_killed_after_the_last_part_or_in_assembly_resumes_to_the_whole_output(output, kill_at, inputs, bert_case,
                                                                                expected, tmp_path):
    """70 rows in parts of 16: the rows are not a multiple of the part size (the case that failed every re-run
    with 'start_row 70 is not a multiple of the chunk size 16')."""
    common = [str(bert_case.export), str(inputs["text"]), "-o", str(tmp_path / output), "--part-rows",
              str(PART_ROWS), "--processes", "1"]
    assert run_cli(*common, env={KILL_ENV: kill_at}).returncode == -9
    resumed = run_cli(*common)
    assert resumed.returncode == 0, resumed.stderr
    np.testing.assert_array_equal(vectors_of(tmp_path / output), expected)
    assert not list(tmp_path.rglob("*.tmp"))
    again = run_cli(*common)
    assert again.returncode == 0 and "is already complete (70 texts)" in again.stderr


# ----- 2. one job per output -----
@contextlib.contextmanager
def output_locked_by_another_process(out):
    """A separate process holding embed's lock on ``out`` (as a running job does); yields it, then kill -9s it,
    so the kernel releases the lock."""
    script = ("import sys, time\nfrom peft_export.corpus.state import OutputLock\n"
              "from peft_export.corpus.writers import OutputTarget\n"
              "OutputLock(OutputTarget.for_path(sys.argv[1]))\nprint('locked', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_second_job_on_an_output_in_use_is_refused(inputs, bert_case, tmp_path):
    out = tmp_path / "out"
    with output_locked_by_another_process(out) as holder:
        with pytest.raises(OutputExistsError, match=rf"out is in use by another embed job \(process {holder.pid}\)"):
            embed_corpus(bert_case.export, inputs["text"], out, part_rows=PART_ROWS)
        with pytest.raises(OutputExistsError, match=r"in use by another embed job"):
            embed_corpus(bert_case.export, inputs["csv"], out, part_rows=PART_ROWS, force=True)
    assert embed_corpus(bert_case.export, inputs["text"], out, part_rows=PART_ROWS, progress=False).rows == 70


@pytest.mark.slow
def test_two_real_jobs_on_one_output_the_second_is_refused(inputs, bert_case, tmp_path):
    """Two `embed` runs with different inputs on one output: the second exits 2 while the first runs (they used to
    both exit 0 with a mix of their rows); after the first is killed, its job resumes."""
    source = write(tmp_path / "big.txt", "".join(f"text number {i} " * 40 + "\n" for i in range(3000)))
    out = tmp_path / "out"
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen([sys.executable, "-m", "peft_export.cli", "embed", str(bert_case.export), str(source),
                              "-o", str(out), "--part-rows", "256", "--processes", "1"], env=full_env,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out / "part-000000.parquet").exists():
            time.sleep(0.1)
        second = run_cli(str(bert_case.export), str(inputs["text"]), "-o", str(out), "--processes", "1")
        assert first.poll() is None, "the first job ended before the second started; make its input longer"
        assert second.returncode == 2
        assert f"is in use by another embed job (process {first.pid})" in second.stderr
    finally:
        first.kill()
        first.wait()
    resumed = run_cli(str(bert_case.export), str(source), "-o", str(out), "--part-rows", "256", "--processes", "1")
    assert resumed.returncode == 0 and "resuming:" in resumed.stderr, resumed.stderr
    assert pq.read_table(out).num_rows == 3000


# ----- 3. --force deletes only what embed wrote -----
@pytest.mark.parametrize("force", [False, True])
def test_output_that_is_or_holds_the_input_is_refused_before_anything_is_touched(force, bert_case, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    source = write(folder / "c.parquet", "not read")
    for output in (source, folder, tmp_path):
        with pytest.raises(InputError, match=r"is or holds the input .*c.parquet.*outside the input"):
            embed_corpus(bert_case.export, source, output, force=force)
    assert source.read_text() == "not read" and sorted(p.name for p in folder.iterdir()) == ["c.parquet"]


def test_force_refuses_dotfiles_and_files_embed_did_not_write(inputs, bert_case, tmp_path):
    out = tmp_path / "out"
    embed_corpus(bert_case.export, inputs["text"], out, part_rows=PART_ROWS, progress=False)
    for name in (".env", ".gitignore", "notes.md"):
        (out / name).write_text("mine")
        with pytest.raises(OutputExistsError, match=rf"not embed output \({name}\); not deleting it even with"):
            embed_corpus(bert_case.export, inputs["text"], out, part_rows=8, force=True)
        assert (out / name).read_text() == "mine"
        (out / name).unlink()
    # A folder of parts without embed's state file is not embed's either.
    (out / "_embed_state.json").unlink()
    with pytest.raises(OutputExistsError, match=r"not embed output \(part-000000.parquet, .*\)"):
        embed_corpus(bert_case.export, inputs["text"], out, part_rows=8, force=True)


# ----- 4. finished parts are verified -----
@pytest.mark.parametrize("attack", ["flip", "swap", "delete"])
def test_a_changed_or_missing_part_is_redone(attack, inputs, bert_case, expected, tmp_path):
    out = tmp_path / "out"
    embed_corpus(bert_case.export, inputs["text"], out, part_rows=PART_ROWS, progress=False)
    first, second = out / "part-000001.parquet", out / "part-000002.parquet"
    if attack == "flip":
        data = bytearray(first.read_bytes())
        data[len(data) // 2] ^= 0x01
        first.write_bytes(bytes(data))
    elif attack == "swap":
        a, b = first.read_bytes(), second.read_bytes()
        first.write_bytes(b)
        second.write_bytes(a)
    else:
        first.unlink()
    logged = []
    result = embed_corpus(bert_case.export, inputs["text"], out, part_rows=PART_ROWS, progress=False,
                          log=logged.append)
    why = "is missing" if attack == "delete" else "does not match the hash recorded when it was written"
    assert f"part-000001.parquet {why}: redoing the job from part 1 (row 16)" in logged[0]
    assert result.resumed_rows == PART_ROWS
    np.testing.assert_array_equal(read_parquet(out)[1], expected)


def test_a_changed_one_file_output_is_named_and_redone(inputs, bert_case, expected, tmp_path):
    out = tmp_path / "v.npy"
    embed_corpus(bert_case.export, inputs["text"], out, part_rows=PART_ROWS, progress=False)
    data = bytearray(out.read_bytes())
    data[-3] ^= 0x01
    out.write_bytes(bytes(data))
    logged = []
    embed_corpus(bert_case.export, inputs["text"], out, part_rows=PART_ROWS, progress=False, log=logged.append)
    assert logged[0] == "v.npy does not match the hash recorded when it was written: embedding the input again"
    np.testing.assert_array_equal(np.load(out), expected)


# ----- 5. OS and worker failures: one line, exit 2, resumable -----
def test_output_under_a_file_or_in_proc_is_one_line(inputs, bert_case, tmp_path, capsys):
    blocker = write(tmp_path / "plain", "a file")
    for output, message in ((blocker / "out", r"Cannot write .*plain.*: Not a directory; part of the path is a file"),
                            ("/proc/peft-export-out", r"Cannot write /proc/peft-export-out")):
        with pytest.raises(OutputError, match=message):
            embed_corpus(bert_case.export, inputs["text"], output)
        assert main(["embed", str(bert_case.export), str(inputs["text"]), "-o", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("peft-export: error: Cannot write")


@pytest.mark.parametrize("code, message", [
    (28, r"part-000002.parquet: No space left on device; free some space .*resume"),  # ENOSPC
    (30, r"part-000002.parquet: Read-only file system; the file system is read-only; choose another"),  # EROFS
])
def test_a_full_disk_is_one_line_and_resumable(code, message, inputs, bert_case, expected, tmp_path, monkeypatch):
    """ENOSPC / EROFS while writing the third part: one line with the path and the fix; the re-run resumes."""
    from peft_export.corpus import job as job_module

    real = job_module.write_part

    def write_part(target, index, *args):
        if index == 2:
            raise OSError(code, os.strerror(code), str(target.part_path(index)))
        return real(target, index, *args)

    monkeypatch.setattr(job_module, "write_part", write_part)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=message):
        embed_corpus(bert_case.export, inputs["text"], out, part_rows=PART_ROWS, progress=False)
    monkeypatch.setattr(job_module, "write_part", real)
    result = embed_corpus(bert_case.export, inputs["text"], out, part_rows=PART_ROWS, progress=False)
    assert result.resumed_rows == 2 * PART_ROWS
    np.testing.assert_array_equal(read_parquet(out)[1], expected)


def test_a_read_only_output_is_one_line(inputs, bert_case, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=r"Permission denied; no permission to write there"):
            embed_corpus(bert_case.export, inputs["text"], folder / "out")
    finally:
        folder.chmod(0o755)


@pytest.mark.slow
def test_a_killed_worker_process_is_one_line_and_resumable(inputs, bert_case, expected, tmp_path):
    """SIGKILL to a worker of the pool (as the OOM killer does): BrokenProcessPool becomes one line, exit 2."""
    source = write(tmp_path / "big.txt", "".join(f"text number {i} " * 40 + "\n" for i in range(4000)))
    out = tmp_path / "out"
    common = [str(bert_case.export), str(source), "-o", str(out), "--part-rows", "512", "--processes", "2"]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    job = subprocess.Popen([sys.executable, "-m", "peft_export.cli", "embed", *common], stderr=subprocess.PIPE,
                           text=True, env=full_env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "part-000000.parquet").exists():
        time.sleep(0.2)
    children = [int(p) for p in subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True,
                                               text=True).stdout.split()]
    workers = [pid for pid in children if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
    assert workers, "no worker processes found"
    os.kill(workers[0], 9)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 2, err
    assert err.strip().count("\n") == 0 and "A worker process died" in err and "resume" in err
    assert subprocess.run([sys.executable, "-m", "peft_export.cli", "embed", *common], env=full_env,
                          capture_output=True, text=True, timeout=600).returncode == 0


@pytest.mark.parametrize("content, id_column, message", [
    ('{"text": "a", "id": 1}\n{"text": "b", "id": 18446744073709551616}\n', "id",
     r"line 2: 'id' holds an integer that does not fit in 64 bits; write it as a string"),
    ('{"text": "a", "id": 1}\n{"text": "b", "id": 1.5}\n', "id",
     r"the id column 'id' \(--id-column\) must hold all integers or all strings, found int \(first at line 1\), "
     r"float \(first at line 2\)"),
    ('{"text": "a"}\n{"text": "b"}\n', "doc", r"line 1 has no id field 'doc'.*Name the id field with --id-column"),
])
def test_ids_that_cannot_be_written_are_named_by_line(content, id_column, message, bert_case, tmp_path):
    source = write(tmp_path / "in.jsonl", content)
    with pytest.raises(InputError, match=message):
        embed_corpus(bert_case.export, source, tmp_path / "out", id_column=id_column)
    assert not (tmp_path / "out").exists()


def test_a_parquet_with_two_columns_of_one_name_is_refused(bert_case, tmp_path):
    pa = pytest.importorskip("pyarrow")
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"])
    pq.write_table(table, tmp_path / "dup.parquet")
    with pytest.raises(InputError, match=r"has 2 columns named 'text', so it is ambiguous"):
        embed_corpus(bert_case.export, tmp_path / "dup.parquet", tmp_path / "out")


# ----- 6. bad rows named by file and line before work is lost -----
def test_a_lone_surrogate_is_named_by_line_before_any_part(bert_case, tmp_path):
    lines = [json.dumps({"text": f"row {i}"}) for i in range(1200)]
    lines[1100] = '{"text": "bad \\ud800 here"}'
    source = write(tmp_path / "in.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"in.jsonl line 1101: 'text' holds '\\ud800' at character 4, a lone "
                                         r"surrogate"):
        embed_corpus(bert_case.export, source, tmp_path / "out", part_rows=256)
    assert not (tmp_path / "out").exists()


# ----- 7. bounded cost per input -----
def test_a_huge_text_embeds_as_its_truncation(bert_case, bert_model, tmp_path):
    """A 2 MB text is tokenized as a prefix (TextTokenizer.truncation_prefixes), and its vector equals that of
    the text cut to the tokens the reference model keeps."""
    words = " ".join(f"word{i % 97}" for i in range(400_000))
    assert len(words) > 2_000_000
    tokenizer = bert_model._tokenizer
    assert len(tokenizer.truncation_prefixes([words])[0]) < 10_000
    kept = tokenizer.tokenizer.encode(words[:20_000]).ids[1:-1]  # what truncation keeps of the whole text
    cut = tokenizer.tokenizer.decode(kept)
    np.testing.assert_allclose(bert_model.encode([words])[0], bert_model.encode([cut])[0], atol=1e-6)
    out = tmp_path / "v.npy"
    embed_corpus(bert_case.export, write(tmp_path / "one.txt", words + "\nshort\n"), out, progress=False)
    np.testing.assert_array_equal(np.load(out), bert_model.encode([words, "short"]))


def test_an_unbroken_huge_text_is_capped(bert_model):
    tokenizer = bert_model._tokenizer
    (prefix,) = tokenizer.truncation_prefixes(["x" * 3_000_000])
    assert len(prefix) == tokenizer.max_text_chars


# ----- 8. CSV -----
def test_csv_with_an_open_quote_is_refused_and_bom_and_big_fields_are_read(bert_case, bert_model, tmp_path):
    source = write(tmp_path / "open.csv", 'id,text\n1,"never closed\n2,b\n3,c\n')
    with pytest.raises(InputError, match=r"a quoted field opened at line 2 is never closed"):
        embed_corpus(bert_case.export, source, tmp_path / "o1")
    big = "y " * 100_000  # 200 KB, over the csv module's 128 KiB default
    source = tmp_path / "bom.csv"
    source.write_bytes(b"\xef\xbb\xbfid,text\n1,hello\n2," + big.encode() + b"\n")
    out = tmp_path / "o2.parquet"
    embed_corpus(bert_case.export, source, out, id_column="id", progress=False)
    table, got = read_parquet(out)
    assert table.column("id").to_pylist() == ["1", "2"]
    np.testing.assert_array_equal(got, bert_model.encode(["hello", big]))


# ----- 9. consistent re-runs and messages -----
def test_unsupported_suffix_empty_count_and_help(inputs, bert_case, tmp_path, capsys):
    with pytest.raises(InputError, match=r"Output v2.csv: embed writes a folder of Parquet parts .* not .csv"):
        embed_corpus(bert_case.export, inputs["text"], tmp_path / "v2.csv")
    assert not (tmp_path / "v2.csv").exists()
    assert main(["embed", str(bert_case.export), str(inputs["text"]), "-o", str(tmp_path / "v.npy"),
                 "--processes", "1"]) == 0
    assert "(3 of them empty)" in capsys.readouterr().err  # texts 3, 40 and 66 are ""
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    assert "default: one per core" in " ".join(capsys.readouterr().out.split())


def test_ray_refuses_bad_input_and_input_in_output_before_ray_starts(bert_case, tmp_path):
    from peft_export.ray.embed_job import embed_with_ray

    lines = [json.dumps({"text": f"row {i}"}) for i in range(5)] + ['{"text": 7}']
    source = write(tmp_path / "in.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"in.jsonl line 6: 'text' is int, expected a string"):
        embed_with_ray(str(bert_case.export), str(source), str(tmp_path / "out"))
    with pytest.raises(InputError, match=r"is or holds the input"):
        embed_with_ray(str(bert_case.export), str(source), str(tmp_path), force=True)
    assert source.is_file()
    with pytest.raises(PeftExportError, match=r"adapter"):
        embed_with_ray(str(bert_case.export), str(write(tmp_path / "ok.txt", "a\n")), str(tmp_path / "o"),
                       adapter="nope")


# ----- --ray keeps the same promises: one lock for both kinds, output by one rename, leftovers cleaned -----
RAY_DRIVER = ("import sys, ray\n"
              "ray.init(address='local', _node_ip_address='127.0.0.1', num_cpus=2, include_dashboard=False, "
              "configure_logging=False)\n"
              "from peft_export.cli import main\n"
              "sys.exit(main(['embed', *sys.argv[1:], '--ray']))\n")


def ray_cli(*args: str, env: dict | None = None, wait: bool = True):
    """`embed ... --ray` in a process that started its Ray instance on loopback (embed joins it)."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-c", RAY_DRIVER, *args], env=full_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def fake_ray_output(folder, *extra: str):
    """A folder as embed --ray leaves it: its marker and Ray's Parquet files (plus ``extra`` files)."""
    folder.mkdir()
    (folder / "_embed_ray.json").write_text("{}\n")
    pq.write_table(pa_table(), folder / "3f2a_000000_000000-0.parquet")
    for name in extra:
        (folder / name).write_text("mine")
    return folder


def pa_table():
    import pyarrow as pa

    return pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array([0.5, 0.5], pa.float32()), 2)})


def test_a_ray_job_is_refused_while_another_job_holds_the_output(bert_case, inputs, tmp_path):
    pytest.importorskip("ray")
    from peft_export.ray.embed_job import embed_with_ray

    out = tmp_path / "out"
    with output_locked_by_another_process(out) as holder:
        for force in (False, True):  # refused before Ray starts, and nothing is written
            with pytest.raises(OutputExistsError, match=rf"out is in use by another embed job \(process {holder.pid}"):
                embed_with_ray(str(bert_case.export), str(inputs["text"]), str(out), force=force)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.embed.lock"]


def test_ray_outputs_and_leftovers_are_embeds_own_and_nothing_else(bert_case, inputs, expected, tmp_path):
    pytest.importorskip("ray")
    from peft_export.ray.embed_job import embed_with_ray

    # A finished --ray output: a local job does not mix its parts into it; with --force it replaces it.
    out = fake_ray_output(tmp_path / "out")
    with pytest.raises(OutputExistsError, match=r"out holds the output of embed --ray, .* pass --force to replace"):
        embed_corpus(bert_case.export, inputs["text"], out, part_rows=PART_ROWS)
    with pytest.raises(OutputExistsError, match=r"Output .*out already exists; pass --force to replace it \(embed "
                                                r"--ray starts from scratch, it does not resume\)"):
        embed_with_ray(str(bert_case.export), str(inputs["text"]), str(out))
    # ... but not when it holds a file embed did not write, with either kind of job.
    (out / ".env").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"not embed output \(.env\); not deleting it even with --force"):
        embed_with_ray(str(bert_case.export), str(inputs["text"]), str(out), force=True)
    with pytest.raises(OutputExistsError, match=r"not embed output \(.env\); not deleting it even with --force"):
        embed_corpus(bert_case.export, inputs["text"], out, part_rows=PART_ROWS, force=True)
    assert (out / ".env").read_text() == "mine"
    (out / ".env").unlink()
    # The leftovers of a killed --ray run (being built; an old output moved aside; killed before the marker) are
    # recognised and removed by the next run, a local one here.
    built = fake_ray_output(tmp_path / ".out.embed-tmp-0a1b2c3d")
    aside = fake_ray_output(tmp_path / ".out.embed-tmp-4e5f6a7b")
    (tmp_path / ".out.embed-tmp-8c9d0e1f").mkdir()
    embed_corpus(bert_case.export, inputs["text"], out, part_rows=PART_ROWS, force=True, progress=False)
    np.testing.assert_array_equal(read_parquet(out)[1], expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not built.exists() and not aside.exists()
    # A folder of that name holding a file embed did not write is not deleted; the error names it.
    fake_ray_output(tmp_path / ".out.embed-tmp-0a1b2c3d", "notes.md")
    with pytest.raises(OutputExistsError, match=r"\.out\.embed-tmp-0a1b2c3d is named like a temporary folder of "
                                                r"embed --ray but holds files embed did not write \(notes.md\)"):
        embed_corpus(bert_case.export, inputs["text"], out, part_rows=PART_ROWS)
    assert (tmp_path / ".out.embed-tmp-0a1b2c3d" / "notes.md").read_text() == "mine"


@pytest.mark.slow
def test_a_killed_ray_job_leaves_no_output_and_blocks_no_one(bert_case, inputs, expected, tmp_path):
    """kill -9 of a running `embed --ray` (after Ray wrote its files, before they became the output): while it ran,
    a second job of either kind was refused; after it, no output is visible and a plain re-run completes (it used to
    leave a partial folder without a marker that even --force refused). A finished output is then refused without
    --force and replaced with it, also when that run is killed between the swap and deleting the old output."""
    pytest.importorskip("ray")
    pytest.importorskip("peft_export.ray", reason="peft_export.ray (the Ray Data helper) is not in this branch")
    out = tmp_path / "out"
    common = (str(bert_case.export), str(inputs["parquet"]), "-o", str(out))
    first = ray_cli(*common, env={KILL_ENV: "ray-written"}, wait=False)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(tmp_path.glob(".out.embed-tmp-*/_embed_ray.json")):
            time.sleep(0.05)
        local = run_cli(*common, "--processes", "1")
        ray_second = run_cli(*common, "--ray", "--force")  # refused before it starts Ray
        assert first.poll() is None, "the --ray job ended before the others started"
        for second in (local, ray_second):
            assert second.returncode == 2
            assert second.stderr.strip().endswith(f"out is in use by another embed job (process {first.pid}); wait "
                                                  f"for it to finish or choose another output path"), second.stderr
        assert first.wait(timeout=300) == -9, first.stderr.read()
    finally:
        first.kill()
        first.wait()
        first.stderr.close()
        first.stdout.close()
    assert not out.exists()  # never a partial output
    [leftover] = tmp_path.glob(".out.embed-tmp-*")
    assert (leftover / "_embed_ray.json").is_file() and list(leftover.glob("*.parquet"))

    rerun = ray_cli(*common)
    assert rerun.returncode == 0, rerun.stderr
    assert "embedded 70 texts with Ray" in rerun.stderr
    np.testing.assert_allclose(read_parquet(out)[1], expected, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []

    refused = run_cli(*common, "--ray")
    assert refused.returncode == 2
    assert "already exists; pass --force to replace it (embed --ray starts from scratch" in refused.stderr
    before = out.stat().st_ino  # the parts' names are the same in every run (part-<first row>.parquet)
    replaced = ray_cli(*common, "--force", env={KILL_ENV: "ray-swapped"})
    assert replaced.returncode == -9
    after = sorted(p.name for p in out.iterdir())
    assert out.stat().st_ino != before and after == ["_embed_ray.json", "part-000000000000.parquet"]  # the new one
    np.testing.assert_allclose(read_parquet(out)[1], expected, atol=1e-6)
    # The old one, left aside by the kill, goes with the next run (a local one, replacing Ray's output).
    assert len(list(tmp_path.glob(".out.embed-tmp-*"))) == 1
    assert run_cli(*common, "--processes", "1", "--part-rows", str(PART_ROWS), "--force").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    np.testing.assert_array_equal(read_parquet(out)[1], expected)


@pytest.mark.parametrize("exchange", [True, False])
def test_a_finished_ray_folder_replaces_the_old_output_whole(exchange, tmp_path, monkeypatch):
    """With the one-step exchange and without it (another OS or file system: the old output is renamed aside
    first), the new folder ends at the output and nothing else is left; a link to a folder is replaced, never
    followed."""
    from peft_export.ray import embed_job as ray_job
    from peft_export.corpus.writers import OutputTarget

    if not exchange:
        monkeypatch.setattr(ray_job, "exchange_folders", lambda a, b: False)
    target = OutputTarget.for_path(tmp_path / "out")
    for old in ("folder", "link"):
        linked = fake_ray_output(tmp_path / "linked") if old == "link" else None
        if linked:
            target.path.symlink_to(linked)
        else:
            fake_ray_output(target.path, "old.parquet")
        new = fake_ray_output(target.new_leftover_path(), "new.parquet")
        ray_job._put_in_place(new, target)
        assert not target.path.is_symlink() and (target.path / "new.parquet").is_file()
        assert not (target.path / "old.parquet").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == (["linked", "out"] if linked else ["out"])
        if linked:
            assert sorted(p.name for p in linked.iterdir()) == ["3f2a_000000_000000-0.parquet", "_embed_ray.json"]
        shutil.rmtree(target.path)
