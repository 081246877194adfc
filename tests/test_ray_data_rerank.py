"""peft_export.ray.rerank_dataset on a local Ray instance (2 CPUs, loopback): the score column equals in-process
``CrossEncoderModel.predict`` (1e-6, relative for logits) for the base and an adapter of a switchable reranker, and
is a fixed-size list for a model with several labels; ids and other columns are kept; a job given the other task's
export, or an adapter, prompt or activation the export does not take, is refused on the driver, before any actor
starts; an actor killed mid-job is restarted and its batch scored again; an export replaced after the driver's
check is refused by the actors; a null text is named by its row's id; empty and 10 MB texts score as in-process."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from peft_export import AdapterNotFoundError, ConfigError, CrossEncoderModel

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")

from peft_export.ray import BatchScorer, embed_dataset, rerank_dataset  # noqa: E402
from peft_export.ray.local import init_ray  # noqa: E402

pytestmark = pytest.mark.slow

N = 120
QUERIES = ["How do I reset my password?", "What is the capital of France?", "Is the man asleep?"]
DOCUMENTS = ["Open the settings page, choose Security and click 'Reset password'.",
             "Paris is the capital and most populous city of France.", "A man is sleeping on a sofa.", "Hi"]


@pytest.fixture(scope="module")
def ray_local():
    from ray.data import DataContext

    init_ray(num_cpus=2, log_to_driver=False)  # on loopback, as embed --ray starts it
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    context = DataContext.get_current()
    context.enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def exports(zoo, reranker):
    import reranker_fixtures

    return {"rr": reranker_fixtures.switchable_reranker(zoo, reranker),
            "nli": reranker_fixtures.nli_reranker(zoo)["export"], "embedder": zoo.case("bert", "bert").export}


def _rows():
    ids = [500 + 3 * i for i in range(N)]  # not 0..N-1, so a lost or shifted row shows
    return ids, [QUERIES[i % 3] + f" #{i}" for i in range(N)], [DOCUMENTS[i % 4] for i in range(N)]


def _dataset(blocks: int = 4):
    ids, queries, documents = _rows()
    table = pa.table({"pair_id": ids, "query": queries, "document": documents, "source": ["web"] * N})
    step = -(-N // blocks)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, N, step)])


def _fails(ds, match: str) -> None:
    """Consuming ``ds`` raises an error matching ``match``."""
    with pytest.raises(Exception, match=match):
        _collected(ds)


def _collected(ds) -> pa.Table:
    """The output in id order: Ray Data may emit rows out of input order; each row's score stays with it."""
    return pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("pair_id")


@pytest.mark.parametrize("adapter", [None, "qv"])
def test_scores_equal_predict_in_process(ray_local, exports, adapter):
    table = _collected(rerank_dataset(_dataset(), exports["rr"], adapter=adapter, activation_fn="identity",
                                      batch_size=32, block_rows=40))
    ids, queries, documents = _rows()
    assert table.column("pair_id").to_pylist() == ids
    assert table.column("source").to_pylist() == ["web"] * N
    assert table.column("score").type == pa.float32()
    want = CrossEncoderModel(exports["rr"]).predict(list(zip(queries, documents)), adapter=adapter or False,
                                                    activation_fn="identity")
    # Logits near 9: an actor's batches pad otherwise than one in-process call, a few float32 ulps (1e-6 each) apart.
    np.testing.assert_allclose(table.column("score").to_numpy(), want, rtol=1e-6, atol=1e-6)


def test_several_labels_give_a_fixed_size_list(ray_local, exports):
    table = _collected(rerank_dataset(_dataset(), exports["nli"], adapter="nli-qk", keep_columns=False,
                                      id_column="pair_id", output_column="labels"))
    assert table.column_names == ["pair_id", "labels"]
    column = table.column("labels").combine_chunks()
    assert column.type == pa.list_(pa.float32(), 3)
    _, queries, documents = _rows()
    want = CrossEncoderModel(exports["nli"]).predict(list(zip(queries, documents)), adapter="nli-qk")
    np.testing.assert_allclose(column.values.to_numpy().reshape(N, 3), want, atol=1e-6)


def _refused(cases, exports) -> None:
    """Each (job, export key, keyword arguments, error type, message pattern) raises when the job is called."""
    for job, export, kwargs, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            job(kwargs.pop("ds") if "ds" in kwargs else _dataset(), exports[export], **kwargs)


def test_the_other_tasks_export_and_bad_columns_are_refused(ray_local, exports):
    scored = _dataset().map_batches(lambda batch: batch.append_column("score", pa.array([0.5] * batch.num_rows)),
                                    batch_format="pyarrow")  # e.g. a first-stage retriever's score
    _refused([
        (rerank_dataset, "embedder", {}, ConfigError,
         r"is an export of the 'embedding' task; rerank_dataset takes 'reranker' exports \(use embed_dataset\)"),
        (embed_dataset, "rr", {"column": "query"}, ConfigError,
         r"is an export of the 'reranker' task; embed_dataset takes 'embedding' exports \(use rerank_dataset\)"),
        (rerank_dataset, "rr", {"document_column": "passage"}, ConfigError,
         r"document_column 'passage' is not a column of the dataset; it has \['pair_id', 'query', 'document', "
         r"'source'\]"),
        (rerank_dataset, "rr", {"query_column": "pair_id"}, ConfigError,
         r"Column 'pair_id' must hold strings, found int64"),
        (rerank_dataset, "rr", {"output_column": "source"}, ConfigError,
         r"output_column 'source' is already a column of the dataset; pass another output_column= or rename that "
         r"column first"),
        (rerank_dataset, "rr", {"ds": scored}, ConfigError,
         r"output_column 'score' is already a column of the dataset"),
        (embed_dataset, "embedder", {"column": "document", "output_column": "query"}, ConfigError,
         r"output_column 'query' is already a column of the dataset"),
    ], exports)


def test_apply_softmax_equals_predict(ray_local, exports):
    table = _collected(rerank_dataset(_dataset(), exports["nli"], adapter="nli-qv", apply_softmax=True,
                                      activation_fn="identity"))
    _, queries, documents = _rows()
    want = CrossEncoderModel(exports["nli"]).predict(list(zip(queries, documents)), adapter="nli-qv",
                                                     activation_fn="identity", apply_softmax=True)
    got = table.column("score").combine_chunks().values.to_numpy().reshape(N, 3)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_what_the_export_does_not_take_is_refused_on_the_driver(ray_local, exports):
    """rerank_dataset raises itself (the dataset is lazy: nothing has run on an actor yet). The driver opens the
    export with the actors' model_options, so a provider this machine lacks is named here too."""
    _refused([
        (rerank_dataset, "rr", {"adapter": "nope"}, AdapterNotFoundError,
         r"Adapter with name 'nope' not found. Loaded adapters: \['qk', 'qv'\]"),
        (rerank_dataset, "rr", {"adapter": "../qv"}, AdapterNotFoundError, r"Adapter with name '../qv' not found"),
        (rerank_dataset, "rr", {"activation_fn": "softmax"}, ConfigError,
         r"activation_fn must be a function or one of sigmoid, identity, tanh, found 'softmax'$"),
        (rerank_dataset, "rr", {"prompt_name": "web"}, ConfigError, r"Prompt name 'web' not found"),
        (rerank_dataset, "rr", {"model_options": {"providers": ["NopeExecutionProvider"]}}, ConfigError,
         r"NopeExecutionProvider"),
    ], exports)


def killer(marker: Path) -> type[BatchScorer]:
    """A BatchScorer whose process is killed with SIGKILL (kill -9: no cleanup, no exception) on its first batch
    after ``marker`` is created, exactly once over all actors and restarts. (Defined in a function so that Ray
    pickles the class by value: actors cannot import test modules.)"""

    class Killer(BatchScorer):
        def __call__(self, batch):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return super().__call__(batch)
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

    return Killer


def test_an_actor_killed_mid_job_is_restarted_and_the_scores_equal_an_uninterrupted_run(ray_local, exports, tmp_path):
    marker = tmp_path / "killed-once"
    options = {"adapter": "qk", "activation_fn": "identity", "batch_size": 25, "block_rows": 40}
    killed = _collected(rerank_dataset(_dataset(), exports["rr"], scorer=killer(marker), **options))
    assert marker.exists()  # an actor did die mid-job
    whole = _collected(rerank_dataset(_dataset(), exports["rr"], **options))
    ids, queries, documents = _rows()
    assert killed.column("pair_id").to_pylist() == ids  # no row lost, none twice
    np.testing.assert_array_equal(killed.column("score").to_numpy(), whole.column("score").to_numpy())
    want = CrossEncoderModel(exports["rr"]).predict(list(zip(queries, documents)), adapter="qk",
                                                    activation_fn="identity")
    np.testing.assert_allclose(killed.column("score").to_numpy(), want, rtol=1e-6, atol=1e-6)


def test_an_export_replaced_or_deleted_after_the_driver_check_is_refused_by_the_actors(ray_local, exports, reranker,
                                                                                        tmp_path):
    """The job is checked when rerank_dataset is called; its actors start when the dataset is consumed. An actor
    that finds another export at the path (here the merged export of the same base, valid on its own) refuses it
    instead of scoring the rows with it; one that finds a file of the export edited, or no export, refuses too."""
    folder = tmp_path / "rr"
    shutil.copytree(exports["rr"], folder)
    ds = rerank_dataset(_dataset(), folder, num_actors=1)
    shutil.rmtree(folder)
    shutil.copytree(reranker["base_export"], folder)
    _fails(ds, r"changed after the job was checked on the driver")
    ds = rerank_dataset(_dataset(), folder, num_actors=1)
    with open(folder / "tokenizer.json", "ab") as edited:  # edited in place: the same manifest, another file
        edited.write(b" ")
    _fails(ds, r"tokenizer.json does not hold what peft_export.json records")
    shutil.rmtree(folder)
    shutil.copytree(reranker["base_export"], folder)
    ds = rerank_dataset(_dataset(), folder, num_actors=1)
    shutil.rmtree(folder)
    _fails(ds, r"Export folder not found")


def test_empty_and_ten_megabyte_texts_score_as_in_process(ray_local, exports):
    huge = "word " * 2_000_000  # 10 MB: tokenized as its truncation prefix, the same tokens as the whole
    pairs = [("", ""), ("a query", ""), ("", "a document"), ("a query", huge), (huge, "a document")]
    table = pa.table({"pair_id": list(range(len(pairs))), "query": [q for q, _ in pairs],
                      "document": [d for _, d in pairs]})
    got = _collected(rerank_dataset(ray.data.from_arrow(table), exports["rr"], adapter="qv", activation_fn="identity",
                                    num_actors=1))
    want = CrossEncoderModel(exports["rr"]).predict(pairs, adapter="qv", activation_fn="identity")
    np.testing.assert_allclose(got.column("score").to_numpy(), want, rtol=1e-6, atol=1e-6)


def test_a_null_text_is_named_by_its_rows_id(ray_local, exports):
    """Last in the module: the actor of a job that failed this way keeps its CPUs while the failure's traceback
    lives (see docs/scaling.md), so these jobs' actors reserve half a CPU each and leave room for each other."""
    import pandas as pd

    table = pa.table({"pair_id": [10, 11, 12], "query": ["a", None, "c"], "document": ["x", "y", "z"]})
    _fails(rerank_dataset(ray.data.from_arrow(table), exports["rr"], id_column="pair_id", num_actors=1,
                          num_cpus_per_actor=0.5),
           r"Column 'query' has a null value in the row with pair_id=11")
    frame = pd.DataFrame({"pair_id": ["p1", "p2"], "query": ["a", "b"], "document": ["x", float("nan")]})
    _fails(rerank_dataset(ray.data.from_pandas(frame), exports["rr"], id_column="pair_id", num_actors=1,
                          num_cpus_per_actor=0.5),
           r"Column 'document' has a null value in the row with pair_id='p2'")
