"""``peft-export embed`` / ``embed_corpus``: every input format, ids and order, Parquet (folder and file) and .npy,
kept columns, errors with their rows, empty strings, bit-exact equality to ``encode`` of each part, resume after
kill -9 at an exact point (bit-exact to an uninterrupted run), refusal of a mismatched resume."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peft_export.cli import main
from peft_export.corpus import embed_corpus as embed_with_defaults
from peft_export.corpus.job import KILL_ENV
from peft_export.errors import InputError, OutputExistsError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

PART_ROWS = 16


def embed_corpus(*args, **kwargs):
    """In this process unless a test asks for workers: spawning them costs seconds per call."""
    kwargs.setdefault("processes", 1)
    return embed_with_defaults(*args, **kwargs)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def texts(real_texts) -> list[str]:
    """70 texts (parts of 16 -> 5 parts, the last one short): real sentences, empty strings, a lone space, unicode."""
    chosen = list(real_texts[:64])
    chosen[3] = ""
    chosen[40] = ""
    return chosen + [" ", "Émigré café — 東京 — 👍", "", "x", "a tab\tinside", "two  spaces"]


@pytest.fixture(scope="module")
def ids(texts) -> list[str]:
    return [f"doc-{i:03d}" for i in range(len(texts))]


@pytest.fixture(scope="module")
def expected(bert_model, texts) -> np.ndarray:
    """What embed must give: ``encode`` of each part's texts, part by part."""
    return np.concatenate([bert_model.encode(texts[i:i + PART_ROWS]) for i in range(0, len(texts), PART_ROWS)])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, texts, ids) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("embed-inputs")
    paths = {fmt: folder / f"corpus.{fmt}" for fmt in ("jsonl", "csv", "parquet")}
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        for i, (doc, text) in enumerate(zip(ids, texts)):
            # "meta" mixes types (-> JSON text), "n" is an int column, "score" mixes int and float.
            meta = {"k": i} if i % 3 == 0 else (i if i % 3 == 1 else None)
            f.write(json.dumps({"id": doc, "text": text, "n": i, "score": i if i % 2 else i + 0.5, "meta": meta})
                    + "\n")
        f.write("\n")  # a trailing blank line holds no record
    with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "n"])
        writer.writerows([doc, text, str(i)] for i, (doc, text) in enumerate(zip(ids, texts)))
    table = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": texts,
                      "lang": ["en"] * len(texts)})
    pq.write_table(table, paths["parquet"], row_group_size=10)  # row groups that do not line up with the parts
    paths["text"] = folder / "corpus.txt"
    paths["text"].write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return paths


def read_parquet(path: Path):
    table = pq.read_table(path)
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                         dtype=np.float32).reshape(table.num_rows, -1)
    return table, vectors


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "peft_export.cli", "embed", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


# ----- formats, ids, order, outputs -----
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "text"])
def test_every_format_equals_encode_bit_for_bit(fmt, inputs, bert_case, bert_model, expected, ids, tmp_path):
    id_column = None if fmt == "text" else "id"
    result = embed_corpus(bert_case.export, inputs[fmt], tmp_path / "out", id_column=id_column,
                          part_rows=PART_ROWS, progress=False)
    assert (result.rows, result.parts, result.resumed_rows) == (len(expected), 5, 0)
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-{i:06d}.parquet" for i in range(5)]
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [16, 16, 16, 16, 6]
    table, vectors = read_parquet(tmp_path / "out")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), bert_model.get_sentence_embedding_dimension())
    np.testing.assert_array_equal(vectors, expected)  # bit-exact, rows in input order
    if fmt == "text":
        assert table.column_names == ["embedding"]
    else:
        assert table.column_names == ["id", "embedding"]
        got_ids = table.column("id").to_pylist()
        assert got_ids == (list(range(len(ids))) if fmt == "parquet" else ids)


def test_whole_corpus_encode_agrees_within_float_noise(inputs, bert_case, bert_model, texts, tmp_path):
    """Parts are encoded separately, so a part's batches differ from one encode() of the whole corpus: same vectors
    to float32 noise (bit-exact against encode of each part, above)."""
    embed_corpus(bert_case.export, inputs["text"], tmp_path / "v.npy", part_rows=PART_ROWS, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), bert_model.encode(texts), atol=1e-6)


def test_npy_output_and_one_parquet_file(inputs, bert_case, expected, tmp_path):
    embed_corpus(bert_case.export, inputs["jsonl"], tmp_path / "v.npy", part_rows=PART_ROWS, progress=False)
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, expected)
    # Parts removed once the file is whole; the state (embed's marker, with the file's hash) stays.
    assert sorted(p.name for p in (tmp_path / "v.npy.parts").iterdir()) == ["_embed_state.json"]
    assert not list(tmp_path.glob(".*.tmp"))

    embed_corpus(bert_case.export, inputs["csv"], tmp_path / "one.parquet", id_column="id", part_rows=PART_ROWS,
                 progress=False)
    assert pq.ParquetFile(tmp_path / "one.parquet").metadata.num_rows == len(expected)
    _, one = read_parquet(tmp_path / "one.parquet")
    np.testing.assert_array_equal(one, expected)
    assert not list((tmp_path / "one.parquet.parts").glob("part-*"))


def test_bad_numbers_are_refused(inputs, bert_case, tmp_path):
    with pytest.raises(InputError, match=r"threads must be a positive integer, found -1"):
        embed_corpus(bert_case.export, inputs["text"], tmp_path / "v.npy", threads=-1)
    with pytest.raises(InputError, match=r"part_rows must be a positive integer, found 0"):
        embed_corpus(bert_case.export, inputs["text"], tmp_path / "v.npy", part_rows=0)


def test_npy_refuses_ids(inputs, bert_case, tmp_path):
    with pytest.raises(InputError, match=r"\.npy output holds only the vectors.*need a Parquet output"):
        embed_corpus(bert_case.export, inputs["jsonl"], tmp_path / "v.npy", id_column="id")


def test_keep_columns_keep_their_values_and_types(inputs, bert_case, tmp_path):
    embed_corpus(bert_case.export, inputs["jsonl"], tmp_path / "j.parquet", id_column="id",
                 keep_columns=["n", "score", "meta"], part_rows=PART_ROWS, progress=False)
    table = pq.read_table(tmp_path / "j.parquet")
    assert table.column_names == ["id", "n", "score", "meta", "embedding"]
    assert table.schema.field("n").type == pa.int64()
    assert table.schema.field("score").type == pa.float64()
    assert table.schema.field("meta").type == pa.string()  # mixed object/int/null -> JSON text
    assert table.column("n").to_pylist() == list(range(table.num_rows))
    assert table.column("meta").to_pylist()[:3] == ['{"k": 0}', "1", None]

    embed_corpus(bert_case.export, inputs["parquet"], tmp_path / "p", keep_columns=["lang", "id"],
                 part_rows=PART_ROWS, progress=False)
    table = pq.read_table(tmp_path / "p")
    assert table.column_names == ["lang", "id", "embedding"]
    assert table.schema.field("id").type == pa.int64()


def test_cli_embeds_with_a_prompt_like_encode(inputs, bert_case, bert_model, texts, tmp_path):
    if not bert_model.prompts:
        pytest.skip("the tiny model has no prompts")
    name = sorted(bert_model.prompts)[0]
    assert main(["embed", str(bert_case.export), str(inputs["text"]), "-o", str(tmp_path / "v.npy"),
                 "--prompt-name", name, "--part-rows", "100", "--quiet"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), bert_model.encode(texts, prompt_name=name))


def test_progress_bar_shows_rate_and_eta_only_when_asked(inputs, bert_case, tmp_path, capsys):
    embed_corpus(bert_case.export, inputs["text"], tmp_path / "a.npy", part_rows=PART_ROWS, progress=True)
    err = capsys.readouterr().err
    assert "texts/s" in err and "<" in err  # rate, elapsed<remaining
    assert re.search(r"100%.*70(\.0)?/70(\.0)?", err)
    assert main(["embed", str(bert_case.export), str(inputs["text"]), "-o", str(tmp_path / "b.npy")]) == 0
    err = capsys.readouterr().err
    assert "texts/s]" not in err  # stderr is not a terminal: no bar, one summary line
    assert err.startswith("embedded 70 texts (3 of them empty) into")


# ----- errors -----
def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("content, column, message", [
    ('{"text": "a"}\n{"text": 7}\n', "text", r"line 2: 'text' is int, expected a string"),
    ('{"text": "a"}\n{"text": null}\n', "text", r"line 2: 'text' is null, expected a string"),
    ('{"text": "a"}\n{"body": "b"}\n', "text", r"line 2 has no field 'text'; its fields are 'body'"),
    ('{"text": "a"}\n{"text": "b"\n', "text", r"line 2 is not valid JSON"),
    ('["a"]\n', "text", r"line 1 is a JSON list, expected an object"),
    ('{"body": "a"}\n', "body", None),
])
def test_jsonl_errors_name_the_line(content, column, message, bert_case, tmp_path):
    source = write(tmp_path / "in.jsonl", content)
    if message is None:
        assert embed_corpus(bert_case.export, source, tmp_path / "ok.npy", column=column, progress=False).rows == 1
        return
    with pytest.raises(InputError, match=message):
        embed_corpus(bert_case.export, source, tmp_path / "out", column=column)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_csv_and_parquet_errors(bert_case, tmp_path):
    source = write(tmp_path / "in.csv", "id,body\n1,a\n")
    with pytest.raises(InputError, match=r"has no column 'text'; its columns are 'id', 'body'. Pick the text with"):
        embed_corpus(bert_case.export, source, tmp_path / "o1")
    source = write(tmp_path / "ragged.csv", "id,text\n1,a\n2,b,c\n")
    with pytest.raises(InputError, match=r"row 2 \(line 3\) has 3 fields, the header has 2"):
        embed_corpus(bert_case.export, source, tmp_path / "o2")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "nulls.parquet")
    with pytest.raises(InputError, match=r"row 2: 'text' is null, expected a string"):
        embed_corpus(bert_case.export, tmp_path / "nulls.parquet", tmp_path / "o3")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(InputError, match=r"column 'text' holds int64 values, expected strings"):
        embed_corpus(bert_case.export, tmp_path / "ints.parquet", tmp_path / "o4")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(InputError, match=r"has no column 'id'; its columns are 'text'"):
        embed_corpus(bert_case.export, tmp_path / "x.parquet", tmp_path / "o5", id_column="id")


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", r"has no rows to embed \(empty jsonl file\)"),
    ("blank.jsonl", b"\n\n", r"has no rows to embed"),
    ("header.csv", b"id,text\n", r"has no rows to embed \(empty csv file\)"),
    ("empty.txt", b"", r"has no rows to embed"),
    ("latin1.txt", "caf\u00e9\n".encode("latin-1"), r"line 1 is not UTF-8 text"),
    ("garbage.parquet", b"not parquet at all", r"Cannot read .*garbage.parquet as Parquet"),
    ("table.xlsx", b"x", r"Cannot tell the format .* --input-format"),
])
def test_unreadable_or_empty_inputs_are_one_cli_error(name, content, message, bert_case, tmp_path, capsys):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message):
        embed_corpus(bert_case.export, tmp_path / name, tmp_path / "out.npy")
    assert main(["embed", str(bert_case.export), str(tmp_path / name), "-o", str(tmp_path / "out.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peft-export: error: ")
    assert re.search(message, err)
    assert not (tmp_path / "out.npy.parts").exists()


def test_missing_input_and_unknown_adapter_or_prompt(inputs, bert_case, tmp_path):
    with pytest.raises(InputError, match=r"Input file not found: .*nope.jsonl"):
        embed_corpus(bert_case.export, tmp_path / "nope.jsonl", tmp_path / "o")
    with pytest.raises(ValueError, match=r"Prompt name 'nope' not found"):
        embed_corpus(bert_case.export, inputs["text"], tmp_path / "o", prompt_name="nope")
    with pytest.raises(ValueError, match=r"adapter"):
        embed_corpus(bert_case.export, inputs["text"], tmp_path / "o2", adapter="nope")
    # In worker processes the check runs in a worker; its error comes back as the same one-line error.
    with pytest.raises(ValueError, match=r"Prompt name 'nope' not found"):
        embed_corpus(bert_case.export, inputs["text"], tmp_path / "o3", prompt_name="nope", processes=2)
    assert not (tmp_path / "o3").exists()


# ----- existing output, resume -----
def test_existing_output_is_refused_unless_force_or_same_job(inputs, bert_case, expected, tmp_path):
    out = tmp_path / "out"
    embed_corpus(bert_case.export, inputs["jsonl"], out, id_column="id", part_rows=PART_ROWS, progress=False)
    again = embed_corpus(bert_case.export, inputs["jsonl"], out, id_column="id", part_rows=PART_ROWS)
    assert again.resumed_rows == again.rows == len(expected)  # the same job, complete: nothing to do
    with pytest.raises(OutputExistsError, match=r"another embed job.*options.batch_size: 32 -> 8.*--force"):
        embed_corpus(bert_case.export, inputs["jsonl"], out, id_column="id", part_rows=PART_ROWS, batch_size=8)
    with pytest.raises(OutputExistsError, match=r"input.path: .*corpus.jsonl' -> .*corpus.csv'"):
        embed_corpus(bert_case.export, inputs["csv"], out, id_column="id", part_rows=PART_ROWS)
    redone = embed_corpus(bert_case.export, inputs["jsonl"], out, part_rows=8, force=True, progress=False)
    assert (redone.parts, pq.read_table(out).column_names) == (9, ["embedding"])

    (tmp_path / "v.npy").write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match=r"v.npy already exists and was not written by embed"):
        embed_corpus(bert_case.export, inputs["text"], tmp_path / "v.npy")
    with pytest.raises(OutputExistsError, match=r"not replacing it even with --force"):
        embed_corpus(bert_case.export, inputs["text"], tmp_path / "v.npy", force=True)
    assert (tmp_path / "v.npy").read_bytes() == b"mine" and not (tmp_path / "v.npy.parts").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("a user's file")
    with pytest.raises(OutputExistsError, match=r"not an embed job's folder"):
        embed_corpus(bert_case.export, inputs["text"], tmp_path / "notes")
    with pytest.raises(OutputExistsError, match=r"not embed output \(keep.txt\); not deleting it even with --force"):
        embed_corpus(bert_case.export, inputs["text"], tmp_path / "notes", force=True)
    assert (tmp_path / "notes" / "keep.txt").is_file()
    (tmp_path / "notes" / "README").write_text("a user's file")
    with pytest.raises(OutputExistsError, match=r"README is a file; name a folder"):
        embed_corpus(bert_case.export, inputs["text"], tmp_path / "notes" / "README", force=True)


def test_a_line_fixed_in_place_keeps_the_parts_before_it(inputs, bert_case, bert_model, tmp_path):
    """The input's identity for resume is its content: a line edited in place (new size and mtime) after the job was
    killed keeps the parts before it and redoes the rest; the result equals a clean run on the edited file."""
    lines = inputs["text"].read_text(encoding="utf-8").splitlines(keepends=True)
    source = write(tmp_path / "c.txt", "".join(lines))
    out = tmp_path / "out"
    common = [str(bert_case.export), str(source), "-o", str(out), "--part-rows", str(PART_ROWS), "--processes", "1"]
    assert run_cli(*common, env={KILL_ENV: "2"}).returncode == -9  # parts 0-2 done
    lines[40] = "a fixed line, longer than the one it replaces\n"  # row 40: part 2
    write(source, "".join(lines))
    result = run_cli(*common)
    assert result.returncode == 0, result.stderr
    assert "the input rows of part-000002.parquet changed since it was written" in result.stderr
    assert "resuming: 32 of 70 rows done in 2 parts" in result.stderr
    want = np.concatenate([bert_model.encode([t.rstrip("\n") for t in lines[i:i + PART_ROWS]])
                           for i in range(0, len(lines), PART_ROWS)])
    np.testing.assert_array_equal(read_parquet(out)[1], want)


@pytest.mark.parametrize("output, kill_at", [("out", "2"), ("out.parquet", "2:before-state"), ("out.npy", "2")])
def test_resume_after_kill_9_equals_an_uninterrupted_run(output, kill_at, inputs, bert_case, expected, tmp_path):
    """kill -9 right after part 2 is written (after, or before, its state file): the re-run redoes at most that
    part, and the result is bit-for-bit the uninterrupted one."""
    ids = [] if output.endswith(".npy") else ["--id-column", "id"]
    # The folder output runs with the default parallelism (2 worker processes here), killed with its workers alive.
    workers = [] if output == "out" else ["--processes", "1"]
    common = [str(bert_case.export), str(inputs["jsonl"]), *ids, *workers, "--part-rows", str(PART_ROWS)]
    killed = run_cli(*common, "-o", str(tmp_path / output), env={KILL_ENV: kill_at})
    assert killed.returncode == -9, killed.stderr
    work = tmp_path / output if output == "out" else tmp_path / (output + ".parts")
    state = json.loads((work / "_embed_state.json").read_text())
    done = 3 if kill_at == "2" else 2
    assert (state["parts_done"], state["rows_done"], state["complete"]) == (done, done * PART_ROWS, False)
    assert len(list(work.glob("part-*"))) == 3  # with "before-state", part 2 is on disk but not counted
    assert not (tmp_path / output).is_file()

    resumed = run_cli(*common, "-o", str(tmp_path / output))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done * PART_ROWS} of 70 rows done in {done} parts" in resumed.stderr
    assert f"{done * PART_ROWS} of them from an earlier run" in resumed.stderr

    clean = tmp_path / ("clean-" + output)  # the uninterrupted run
    embed_corpus(bert_case.export, inputs["jsonl"], clean, id_column=ids[1] if ids else None, part_rows=PART_ROWS,
                 progress=False)
    if output.endswith(".npy"):
        got, want = np.load(tmp_path / output), np.load(clean)
    else:
        (table, got), (clean_table, want) = read_parquet(tmp_path / output), read_parquet(clean)
        assert table.column("id").to_pylist() == clean_table.column("id").to_pylist()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, expected)


# ----- parallelism, adapters, Ray, light import -----
def test_default_parallelism_rule(bert_case):
    from peft_export.corpus import default_parallelism

    plenty = 64 * 2**30
    assert default_parallelism(bert_case.export, parts=5, cores=2, available_bytes=plenty) == (2, 1)
    assert default_parallelism(bert_case.export, parts=1, cores=2, available_bytes=plenty) == (1, 2)
    assert default_parallelism(bert_case.export, parts=100, cores=16, available_bytes=plenty) == (8, 2)
    assert default_parallelism(bert_case.export, parts=100, cores=4, available_bytes=1) == (1, 4)


def test_default_parallelism_uses_worker_processes_with_the_same_parts(inputs, bert_case, expected, tmp_path):
    result = embed_with_defaults(bert_case.export, inputs["parquet"], tmp_path / "out", id_column="id",
                                 part_rows=PART_ROWS, progress=False)
    assert result.parts == 5
    table, vectors = read_parquet(tmp_path / "out")
    assert table.column("id").to_pylist() == list(range(len(expected)))
    np.testing.assert_array_equal(vectors, expected)


def test_parts_are_encoded_in_slices_the_same_by_any_number_of_processes(inputs, bert_case, bert_model, texts,
                                                                        tmp_path, monkeypatch):
    """Workers take slices of at most WORK_ROWS rows of similar lengths (so the last part is shared); a part is
    encode() of its slices in input order, bit for bit, whether one process or two ran them."""
    from peft_export.corpus import job

    monkeypatch.setattr(job, "WORK_ROWS", 5)
    slices = job.work_slices(texts[:PART_ROWS])
    assert sorted(np.concatenate(slices)) == list(range(PART_ROWS)) and max(len(s) for s in slices) == 5
    lengths = [len(texts[i]) for i in np.concatenate(slices)]
    assert lengths == sorted(lengths, reverse=True)  # longest first: similar lengths share a slice
    want = np.empty((len(texts), bert_model.get_sentence_embedding_dimension()), np.float32)
    for start in range(0, len(texts), PART_ROWS):
        part = texts[start:start + PART_ROWS]
        for rows in job.work_slices(part):
            want[start + rows] = bert_model.encode([part[i] for i in rows])
    for processes in (1, 2):
        embed_corpus(bert_case.export, inputs["text"], tmp_path / f"p{processes}.npy", part_rows=PART_ROWS,
                     processes=processes, progress=False)
        np.testing.assert_array_equal(np.load(tmp_path / f"p{processes}.npy"), want)


def test_adapter_of_a_switchable_export(tmp_path, texts):
    from switchable_fixtures import switchable_export

    from peft_export import EmbeddingModel

    export = switchable_export()
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in texts[:20]), encoding="utf-8")
    embed_corpus(export, source, tmp_path / "attn.npy", adapter="attn", progress=False)
    embed_corpus(export, source, tmp_path / "base.npy", progress=False)
    model = EmbeddingModel(export)
    np.testing.assert_array_equal(np.load(tmp_path / "attn.npy"), model.encode(texts[:20], adapter="attn"))
    assert not np.allclose(np.load(tmp_path / "attn.npy"), np.load(tmp_path / "base.npy"), atol=1e-4)


@pytest.mark.slow
def test_ray_path_equals_the_single_process_run(inputs, bert_case, tmp_path):
    pytest.importorskip("ray")
    pytest.importorskip("peft_export.ray", reason="peft_export.ray (the Ray Data helper) is not in this branch")
    import ray

    from peft_export.ray.embed_job import embed_with_ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    try:
        rows = embed_with_ray(str(bert_case.export), str(inputs["parquet"]), str(tmp_path / "ray"),
                              id_column="id", keep_columns=["lang"])
    finally:
        ray.shutdown()
    assert rows == 70
    embed_corpus(bert_case.export, inputs["parquet"], tmp_path / "local", id_column="id", keep_columns=["lang"],
                 progress=False)
    table, vectors = read_parquet(tmp_path / "ray")
    local_table, local = read_parquet(tmp_path / "local")
    assert table.column_names == ["id", "lang", "embedding"]
    assert table.column("id").to_pylist() == local_table.column("id").to_pylist()
    np.testing.assert_allclose(vectors, local, atol=1e-6)


def test_embed_stays_torch_free(inputs, bert_case, tmp_path):
    code = (
        "import sys\n"
        "from peft_export.cli import main\n"
        f"assert main(['embed', {str(bert_case.export)!r}, {str(inputs['parquet'])!r}, '-o', "
        f"{str(tmp_path / 'o.parquet')!r}, '--id-column', 'id', '--quiet']) == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'sentence_transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture(scope="module")
def local_ray():
    pytest.importorskip("ray")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    yield ray
    ray.shutdown()


def _tricky_inputs(folder: Path) -> dict[str, Path]:
    """Rows Ray's own readers took differently from the local job: blank and whitespace lines, a Unicode line
    separator inside a line, CRLF, a byte order mark, ids with leading zeros, a newline inside a quoted CSV field."""
    lines = ["first", "", "   ", "two\u2028parts", "crlf\r", "last"]
    paths = {"text": folder / "tricky.txt", "csv": folder / "tricky.csv", "jsonl": folder / "tricky.jsonl"}
    paths["text"].write_bytes("\ufeff".encode() + "\n".join(lines).encode() + b"\n")
    with open(paths["csv"], "w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f).writerows([["id", "text"], ["007", "a quoted\nnewline"], ["010", ""], ["3", "plain"]])
    paths["jsonl"].write_text('{"id": "007", "text": "x"}\n\n{"id": "8", "text": ""}\n', encoding="utf-8")
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["text", "csv", "jsonl"])
def test_ray_reads_the_rows_the_local_job_reads(fmt, local_ray, bert_case, tmp_path):
    from peft_export.ray.embed_job import embed_with_ray

    source = _tricky_inputs(tmp_path)[fmt]
    id_column = None if fmt == "text" else "id"
    rows = embed_with_ray(str(bert_case.export), str(source), str(tmp_path / "ray"), id_column=id_column)
    embed_corpus(bert_case.export, source, tmp_path / "local", id_column=id_column, progress=False)
    table, vectors = read_parquet(tmp_path / "ray")
    local_table, local = read_parquet(tmp_path / "local")
    assert rows == local_table.num_rows == {"text": 6, "csv": 3, "jsonl": 2}[fmt]
    if id_column:
        assert table.column("id").to_pylist() == local_table.column("id").to_pylist()
    np.testing.assert_allclose(vectors, local, atol=1e-6)
