"""peft_export.ray.embed_dataset on a local Ray instance (2 CPUs, loopback): the embedding column equals in-process
EmbeddingModel.encode (1e-6) with ids and order kept, actors stay torch-free, and an actor that dies mid-run is
restarted by Ray with its batch retried, the output still complete and correct."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from switchable_fixtures import TEXTS, switchable_export

from peft_export import ConfigError, EmbeddingModel

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")

from peft_export.ray import BatchEmbedder, embed_dataset  # noqa: E402
from peft_export.ray.local import init_ray  # noqa: E402

ATOL = 1e-6
N = 300


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module, as ``embed --ray`` starts it (on loopback, no dashboard): 2 CPUs, rows
    kept in order."""
    from ray.data import DataContext

    init_ray(num_cpus=2, log_to_driver=False)  # on loopback, as embed --ray starts it
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    context = DataContext.get_current()
    before = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.execution_options.preserve_order = before
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus() -> tuple[list[int], list[str]]:
    ids = [1000 + 7 * i for i in range(N)]  # not 0..N-1, so a lost id or a shifted row shows
    return ids, [f"{TEXTS[i % len(TEXTS)]} #{i}" if i % 11 else "" for i in range(N)]


@pytest.fixture(scope="module")
def export() -> Path:
    return switchable_export()


def dataset(corpus, blocks: int = 6):
    ids, texts = corpus
    table = pa.table({"doc_id": ids, "text": texts})
    step = -(-len(ids) // blocks)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, len(ids), step)])


def collect(ds) -> pa.Table:
    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def vectors(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    assert column.type == pa.list_(pa.float32(), column.type.list_size)  # fixed-size float32 list
    return column.values.to_numpy().reshape(len(column), column.type.list_size)


@pytest.mark.parametrize("adapter", ["mixed", pytest.param(None, marks=pytest.mark.slow)])
def test_equals_in_process_encode_with_ids_and_order(ray_local, corpus, export, adapter):
    ids, texts = corpus
    keep = adapter is not None  # the base run also checks keep_columns=False
    out = collect(embed_dataset(dataset(corpus), export, adapter=adapter, batch_size=32, id_column="doc_id",
                                keep_columns=keep))
    assert out.column("doc_id").to_pylist() == ids
    assert out.column_names == (["doc_id", "text", "embedding"] if keep else ["doc_id", "embedding"])
    expected = EmbeddingModel(export).encode(texts, adapter=adapter or False)
    got = vectors(out)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= ATOL
    if adapter:
        assert np.abs(got - EmbeddingModel(export).encode(texts, adapter=False)).max() > 1e-3


def torch_probe() -> type[BatchEmbedder]:
    """A BatchEmbedder adding a column that names torch, transformers or peft if the actor's process imported
    them. (Defined in a function so that Ray pickles the class by value: actors cannot import test modules.)"""

    class TorchProbe(BatchEmbedder):
        def __call__(self, batch):
            import sys

            out = super().__call__(batch)
            heavy = ",".join(m for m in ("torch", "transformers", "peft") if m in sys.modules)
            return out.append_column("heavy_modules", pa.array([heavy] * out.num_rows))

    return TorchProbe


def test_actors_stay_torch_free(ray_local, corpus, export):
    out = collect(embed_dataset(dataset(corpus, 2), export, embedder=torch_probe()))
    assert out.num_rows == N and set(out.column("heavy_modules").to_pylist()) == {""}


def killer(marker: Path) -> type[BatchEmbedder]:
    """A BatchEmbedder whose process exits (as kill -9 would leave it: no cleanup) on its first batch after
    ``marker`` is created, exactly once over all actors and restarts."""

    class Killer(BatchEmbedder):
        def before_batch(self, batch) -> None:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os._exit(1)

    return Killer


@pytest.mark.slow
def test_an_actor_killed_mid_run_is_restarted_and_the_output_is_complete(ray_local, corpus, export, tmp_path):
    ids, texts = corpus
    marker = tmp_path / "killed-once"
    out = collect(embed_dataset(dataset(corpus), export, adapter="attn", batch_size=25, id_column="doc_id",
                                embedder=killer(marker)))
    assert marker.exists()  # an actor did die mid-run
    assert out.column("doc_id").to_pylist() == ids  # no row lost, none twice
    expected = EmbeddingModel(export).encode(texts, adapter="attn")
    assert np.abs(vectors(out) - expected).max() <= ATOL


def test_bad_columns_and_values_are_clear_errors(ray_local, corpus, export):
    ds = dataset(corpus, 1)
    with pytest.raises(ConfigError, match=r"column 'body' is not a column of the dataset; it has \['doc_id', 'text'\]"):
        embed_dataset(ds, export, column="body")
    with pytest.raises(ConfigError, match="id_column 'id' is not a column"):
        embed_dataset(ds, export, id_column="id")
    with pytest.raises(ConfigError, match="Column 'doc_id' must hold strings, found int64"):
        embed_dataset(ds, export, column="doc_id")
    with pytest.raises(ConfigError, match="threads_per_actor=3 is more than the 2 CPUs"):
        embed_dataset(ds, export, threads_per_actor=3)
    with pytest.raises(ConfigError, match="Export folder not found"):
        embed_dataset(ds, export / "missing")
    nulls = ray.data.from_arrow(pa.table({"text": ["fine", None, "also fine"]}))
    with pytest.raises(Exception, match=r"Column 'text' has a null value at row 1 of a batch of 3 \(pass id_column="):
        collect(embed_dataset(nulls, export, num_actors=1))
    with pytest.raises(ValueError, match=r"Adapter with name 'nope' not found"):  # on the driver, before any actor
        embed_dataset(ds, export, adapter="nope")
