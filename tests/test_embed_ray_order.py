"""`embed --ray` writes rows in input order whatever order Ray runs and emits them: each row carries its number from
the staged input to the writer, which writes runs of consecutive rows as ``part-<first row>.parquet``; the driver
checks that the parts tile the rows before the output is put in place."""

from __future__ import annotations

import numpy as np
import pytest
from test_embed import embed_corpus, ids, inputs, local_ray, read_parquet, texts

from peft_export.errors import InputError, PeftExportError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("peft_export.ray", reason="peft_export.ray (the Ray Data helper) is not in this branch")
__all__ = ["ids", "inputs", "local_ray", "texts"]  # fixtures shared with test_embed


def test_rows_stay_in_input_order_when_ray_delivers_them_out_of_order(local_ray, inputs, bert_case, monkeypatch,
                                                                      tmp_path):
    """Ray's read hands the job the input's rows in blocks of 10, last block first (as a pipeline that does not
    keep order may emit them; ``preserve_order`` did not prevent it). The old job wrote them in that order; the
    output must still be the input order, equal to the local job's."""
    import ray.data

    from peft_export.ray.embed_job import embed_with_ray

    real_read = ray.data.read_parquet

    def read_backwards(path, **kwargs):
        table = real_read(path, **kwargs).to_arrow_refs()
        table = pa.concat_tables([ray.get(ref) for ref in table])
        blocks = [table.slice(start, 10) for start in range(0, table.num_rows, 10)]
        return ray.data.from_arrow(blocks[::-1])

    monkeypatch.setattr(ray.data, "read_parquet", read_backwards)
    out = tmp_path / "ray"
    rows = embed_with_ray(str(bert_case.export), str(inputs["parquet"]), str(out), id_column="id")
    embed_corpus(bert_case.export, inputs["parquet"], tmp_path / "local", id_column="id", progress=False)
    table, vectors = read_parquet(out)
    local_table, local = read_parquet(tmp_path / "local")
    assert rows == 70
    assert table.column_names == ["id", "embedding"]  # the row numbers are not in the output
    assert table.column("id").to_pylist() == list(range(70))
    np.testing.assert_allclose(vectors, local, atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["_embed_ray.json", "part-000000000000.parquet"]


def _part(folder, first: int, rows: int) -> None:
    pq.write_table(pa.table({"embedding": pa.array([[0.5]] * rows, pa.list_(pa.float32(), 1))}),
                   folder / f"part-{first:012d}.parquet")


def test_the_writer_splits_a_shuffled_batch_into_runs_of_consecutive_rows(tmp_path):
    from peft_export.ray.embed_job import ROW_COLUMN, check_parts_tile, write_runs_in_order

    order = [5, 6, 0, 7, 1, 2, 9, 3, 4]  # runs 0-7 and 9 (row 8 is in another batch)
    batch = pa.table({"id": [f"r{i}" for i in order], ROW_COLUMN: pa.array(order, pa.int64())})
    written = write_runs_in_order(batch, str(tmp_path))
    assert written.to_pylist() == [{"first_row": 0, "rows": 8}, {"first_row": 9, "rows": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-000000000000.parquet", "part-000000000009.parquet"]
    assert pq.read_table(tmp_path / "part-000000000000.parquet").to_pylist() == [{"id": f"r{i}"} for i in range(8)]
    with pytest.raises(PeftExportError, match=r"the Ray job wrote part-000000000009.parquet where row 8 was due "
                                              r"\(a gap\); run it again"):
        check_parts_tile(tmp_path, 10)
    _part(tmp_path, 8, 1)
    assert check_parts_tile(tmp_path, 10) == 10
    with pytest.raises(PeftExportError, match=r"the Ray job wrote 10 rows of 11; run it again"):
        check_parts_tile(tmp_path, 11)
    assert write_runs_in_order(batch.slice(0, 0), str(tmp_path)).num_rows == 0  # an empty batch writes nothing
    _part(tmp_path, 7, 2)  # rows 7 and 8 again
    with pytest.raises(PeftExportError, match=r"wrote part-000000000007.parquet where row 8 was due \(rows written "
                                              r"twice\)"):
        check_parts_tile(tmp_path, 10)


def test_a_killed_write_task_s_temporary_file_is_embed_s_own(tmp_path):
    """A leftover folder of a killed run holding a write task's temporary file is deleted by the next run (it used
    to be "files embed did not write" and blocked the output)."""
    from peft_export.corpus.writers import OutputTarget, remove_leftovers

    leftover = tmp_path / ".out.embed-tmp-0a1b2c3d"
    leftover.mkdir()
    (leftover / "_embed_ray.json").write_text("{}\n")
    _part(leftover, 0, 2)
    (leftover / ".part-000000000002.parquet.4242.tmp").write_bytes(b"PAR1 half")
    remove_leftovers(OutputTarget.for_path(tmp_path / "out"))
    assert not leftover.exists()


def test_the_row_number_column_name_is_refused_as_an_input_column(bert_case, inputs, tmp_path):
    from peft_export.ray.embed_job import embed_with_ray

    with pytest.raises(InputError, match=r"'__peft_export_row' is the name embed --ray gives the row numbers; "
                                         r"rename that column"):
        embed_with_ray(str(bert_case.export), str(inputs["parquet"]), str(tmp_path / "o"),
                       keep_columns=["__peft_export_row"])


PARALLEL_DRIVER = ("import sys, ray\n"
                   "ray.init(address='local', _node_ip_address='127.0.0.1', num_cpus=4, include_dashboard=False, "
                   "configure_logging=False)\n"
                   "from peft_export.cli import main\n"
                   "sys.exit(main(['embed', *sys.argv[1:], '--ray']))\n")


@pytest.mark.slow
def test_two_actors_with_unequal_blocks_keep_the_input_order(bert_case, tmp_path):
    """A Ray instance of 4 CPUs (2 actors of 2 threads), 3,000 rows in blocks of 1,024 whose first block holds the
    long texts: the other actor finishes the later blocks first; the output is still in input order and equals the
    local job's."""
    import os
    import subprocess
    import sys

    words = "the exported graph runs the merged adapter on every core of the machine " * 12
    rows = [f"{i} {words}" for i in range(1024)] + [f"row {i}" for i in range(1024, 3000)]
    source = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(3000)), "text": rows}), source, row_group_size=256)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", PARALLEL_DRIVER, str(bert_case.export), str(source), "-o",
                           str(tmp_path / "ray"), "--id-column", "id"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    embed_corpus(bert_case.export, source, tmp_path / "local", id_column="id", progress=False)
    table, vectors = read_parquet(tmp_path / "ray")
    assert table.column("id").to_pylist() == list(range(3000))
    np.testing.assert_allclose(vectors, read_parquet(tmp_path / "local")[1], atol=1e-6)
