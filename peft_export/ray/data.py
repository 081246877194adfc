"""``embed_dataset``: embed a text column of a Ray Dataset with an export folder, one model per actor, no torch;
``rerank_dataset``: score a (query, document) pair per row with a reranker export the same way.

Each actor of a Ray Data actor pool opens :class:`~peft_export.runtime.model.EmbeddingModel` once and embeds the
batches it is given (``map_batches`` with the callable class :class:`BatchEmbedder`), adding an ``embedding``
column (a fixed-size list of float32) to every row; every other column, the id included, stays as it was.

Cores, not oversubscribed: an actor runs ONNX Runtime (or OpenVINO) with ``threads_per_actor`` intra-op threads
(default 2, or 1 on a one-CPU cluster), and its tokenizer's thread pool is capped the same way. The default pool is
``num_actors = cluster CPUs // threads_per_actor``, so actors x threads = cores: every core runs one inference
thread, none two. Each actor reserves ``threads_per_actor x (CPUs - 1) / CPUs`` of Ray's CPUs
(``num_cpus_per_actor`` overrides it), which keeps one CPU's worth of Ray's scheduling room free on the cluster: Ray
Data's read, repartition and write tasks need a CPU slot to start, and a pool that reserved every CPU would wait
forever for its own input (seen on a 2-CPU machine). Those tasks are brief and I/O-bound, so they share the cores
without slowing inference much. One actor with two threads beat two single-threaded actors on the idle 2-core test
machine (143.5 vs 127.6 texts/s, 5,000 texts, medians of two alternating rounds; docs/scaling.md), where the pool's
fixed costs (a model load and a Ray worker per actor) weigh; on the same machine under heavy load it was the other
way round.

``rerank_dataset`` runs :class:`BatchScorer` (``CrossEncoderModel.predict`` on each batch's pairs) on the same pool,
adding a ``score`` column (float32; a fixed-size list of them for a model with several labels).

Faults: Ray Data creates pool actors with ``max_restarts=-1`` and ``max_task_retries=-1`` (its defaults; pass
other values as keyword arguments to change them): an actor that dies (killed, OOM, node lost) is restarted and
the batch it held is run again, so the output is complete. Errors in the data (a missing column, a non-string
value) are not retried: they fail the job with a message naming the row by its ``id_column`` value. A restarted
actor opens the export again, and only the one the driver checked (see :func:`_prepared`): never another export
found at the same path meanwhile.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PeftExportError, require

EMBEDDING_COLUMN = "embedding"
SCORE_COLUMN = "score"
# Largest block an actor takes whole: small enough that every actor has work on a one-file dataset and the last
# block does not leave the others idle for long, large enough to sort each call's texts into well-filled batches.
BLOCK_ROWS = 1024
DEFAULT_THREADS_PER_ACTOR = 2  # measured: 1 actor x 2 threads beat 2 x 1 on an idle 2-core machine (docs/scaling.md)


class BatchEmbedder:
    """The callable class behind :func:`embed_dataset`: one ``EmbeddingModel`` per actor, built in ``__init__``.

    Takes and returns ``pyarrow.Table`` batches. Subclass it (and pass ``embedder=``) to add per-batch behaviour;
    ``before_batch`` is called with each batch before it is embedded.
    """

    def __init__(self, export: str, column: str, *, adapter: str | None = None, prompt_name: str | None = None,
                 encode_batch_size: int = 32, threads: int = 1, backend: str | None = None,
                 output_column: str = EMBEDDING_COLUMN, model_options: dict[str, Any] | None = None,
                 id_column: str | None = None, manifest_sha256: str | None = None):
        # Before the tokenizer's thread pool exists (first encode): as many threads as this actor has CPUs.
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        from ..runtime.model import EmbeddingModel

        self.model = _open_pinned(EmbeddingModel, export, manifest_sha256, backend=backend, intra_op_threads=threads,
                                  **(model_options or {}))
        self.column = column
        self.id_column = id_column
        self.output_column = output_column
        self.options = _encode_options(self.model, adapter, prompt_name, encode_batch_size)
        self.dimension = self.model.get_sentence_embedding_dimension()

    def before_batch(self, batch) -> None:
        """Hook for subclasses (called once per batch, before encoding)."""

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        self.before_batch(batch)
        texts = _texts(batch, self.column, self.id_column)
        vectors = np.ascontiguousarray(self.model.encode(texts, **self.options), dtype=np.float32)
        vectors = vectors.reshape(len(texts), self.dimension)  # (rows, dim), also for an empty batch
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        column = pa.FixedSizeListArray.from_arrays(flat, self.dimension)
        return batch.append_column(self.output_column, column)


class BatchScorer:
    """The callable class behind :func:`rerank_dataset`: one ``CrossEncoderModel`` per actor, built in
    ``__init__``; takes and returns ``pyarrow.Table`` batches, adding the score of each row's (query, document)
    pair. ``options`` are ``CrossEncoderModel.predict``'s (``prompt_name``, ``prompt``, ``activation_fn``, ...)."""

    def __init__(self, export: str, query_column: str, document_column: str, *, adapter: str | None = None,
                 predict_batch_size: int = 32, threads: int = 1, backend: str | None = None,
                 output_column: str = SCORE_COLUMN, options: dict[str, Any] | None = None,
                 model_options: dict[str, Any] | None = None, id_column: str | None = None,
                 manifest_sha256: str | None = None):
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # before the tokenizer's thread pool exists
        from ..runtime.reranker_model import CrossEncoderModel

        self.model = _open_pinned(CrossEncoderModel, export, manifest_sha256, backend=backend,
                                  intra_op_threads=threads, **(model_options or {}))
        self.columns = (query_column, document_column)
        self.id_column = id_column
        self.output_column = output_column
        self.options = _score_options(self.model, adapter, predict_batch_size, options)
        self.labels = self.model.num_labels

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        queries, documents = (_texts(batch, column, self.id_column) for column in self.columns)
        pairs = list(zip(queries, documents))
        scores = self.model.predict(pairs, **self.options) if pairs else np.zeros((0, self.labels), np.float32)
        scores = np.ascontiguousarray(scores, dtype=np.float32).reshape(len(pairs), -1)
        if scores.shape[1] == 1:
            return batch.append_column(self.output_column, pa.array(scores[:, 0], type=pa.float32()))
        flat = pa.array(scores.reshape(-1), type=pa.float32())
        return batch.append_column(self.output_column, pa.FixedSizeListArray.from_arrays(flat, scores.shape[1]))


def _adapter_option(model, adapter: str | None) -> dict[str, Any]:
    """The ``adapter`` option of every call an actor makes: the named adapter, or for a switchable export without
    one the base itself (``False``), even when the export activates a default adapter."""
    if adapter is not None:
        return {"adapter": adapter}
    return {"adapter": False} if getattr(model, "is_switchable", False) else {}


def _encode_options(model, adapter: str | None, prompt_name: str | None, batch_size: int) -> dict[str, Any]:
    """The options of every ``encode`` call of an embedding job (its actors', and the driver's check)."""
    options: dict[str, Any] = {"batch_size": batch_size}
    if prompt_name is not None:
        options["prompt_name"] = prompt_name
    return {**options, **_adapter_option(model, adapter)}


def _score_options(model, adapter: str | None, batch_size: int, options: dict[str, Any] | None) -> dict[str, Any]:
    """The options of every ``predict`` call of a rerank job (its actors', and the driver's check)."""
    return {"batch_size": batch_size, **(options or {}), **_adapter_option(model, adapter)}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's content (its JSON, keys sorted). The manifest records the hash of every file the
    runtime reads and a model checks them all when it opens, so equal digests mean the same export."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode("utf-8")).hexdigest()


def _open_pinned(model_class, export: str, manifest_sha256: str | None, **options):
    """``model_class(export, **options)``, refused when its manifest is not the one the driver checked: an export
    replaced (re-exported, ``--force``, another folder moved there) after the job was checked, or between the
    starts of two actors (a restarted one), must not score rows beside actors that run the old one."""
    model = model_class(export, **options)
    if manifest_sha256 is not None and manifest_digest(model.manifest) != manifest_sha256:
        raise ConfigError(f"The export {export} changed after the job was checked on the driver (its manifest is "
                          "another export's); this actor refuses it rather than mix two exports' results in one "
                          "job. Run the job again")
    return model


def _texts(batch, column: str, id_column: str | None = None) -> list[str]:
    """The batch's texts as Python strings; a null or non-string value is an error naming its row by
    ``id_column`` (its position in the batch says nothing: Ray splits and reorders blocks)."""
    import pyarrow as pa

    if column not in batch.column_names:
        raise ConfigError(f"Column {column!r} not found; the dataset has {batch.column_names}")
    values = batch.column(column)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise ConfigError(f"Column {column!r} must hold strings, found {values.type}")
    texts = values.to_pylist()
    for i, text in enumerate(texts):
        if text is None:
            if id_column is not None and id_column in batch.column_names:
                where = f"in the row with {id_column}={batch.column(id_column)[i].as_py()!r}"
            else:
                where = f"at row {i} of a batch of {len(texts)} (pass id_column= to have rows named by their id)"
            raise ConfigError(f"Column {column!r} has a null value {where}; drop or fill nulls first "
                              "(ds.filter(...))")
    return texts


def plan_actors(num_actors: int | None, threads_per_actor: int | None,
                num_cpus_per_actor: float | None = None) -> tuple[int, int, float]:
    """(actors, threads per actor, Ray CPUs reserved per actor) for this Ray cluster (see the module doc)."""
    ray = require("ray", "ray")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = min(DEFAULT_THREADS_PER_ACTOR, cpus) if threads_per_actor is None else threads_per_actor
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads_per_actor must be a positive integer, found {threads_per_actor!r}")
    if threads > cpus:
        raise ConfigError(f"threads_per_actor={threads} is more than the {cpus} CPUs of this Ray cluster; an "
                          "actor asking for it could never start")
    if num_actors is None:
        num_actors = max(1, cpus // threads)
    if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
        raise ConfigError(f"num_actors must be a positive integer, found {num_actors!r}")
    if num_cpus_per_actor is None:
        num_cpus_per_actor = threads * (cpus - 1) / cpus if cpus > 1 else 0.5
    if not isinstance(num_cpus_per_actor, (int, float)) or not 0 < num_cpus_per_actor <= cpus:
        raise ConfigError(f"num_cpus_per_actor must be in (0, {cpus}], found {num_cpus_per_actor!r}")
    return num_actors, threads, float(num_cpus_per_actor)


def embed_dataset(ds, export: str | Path, column: str = "text", adapter: str | None = None,
                  prompt_name: str | None = None, batch_size: int = 256, id_column: str | None = None,
                  num_actors: int | None = None, threads_per_actor: int | None = None, backend: str | None = None,
                  *, num_cpus_per_actor: float | None = None, output_column: str = EMBEDDING_COLUMN,
                  keep_columns: bool = True, encode_batch_size: int = 32, block_rows: int | None = BLOCK_ROWS,
                  embedder: type[BatchEmbedder] = BatchEmbedder, model_options: dict[str, Any] | None = None,
                  **ray_remote_args):
    """``ds`` with an ``embedding`` column: the export's sentence embedding of ``column`` (float32, fixed size).

    ``export`` must be a path every Ray node can read (a shared file system, or the same path on each node).
    ``adapter``/``prompt_name`` as in ``EmbeddingModel.encode``; ``batch_size`` rows per actor call;
    ``id_column``, when given, must exist, and with ``keep_columns=False`` only it and the embedding are kept.
    ``num_actors``, ``threads_per_actor`` and ``num_cpus_per_actor`` size the pool (see the module doc for the
    rule). Extra keyword
    arguments go to ``map_batches`` (e.g. ``resources``, ``memory``).

    Each actor takes whole blocks, so blocks larger than ``block_rows`` rows are first split, streaming
    (``ds.repartition(target_num_rows_per_block=block_rows)``, no shuffle, no barrier): otherwise a dataset of one
    block (one file read as one block) keeps one actor busy and the rest idle. ``block_rows=None`` keeps the
    blocks as they come. Ray Data may emit rows out of input order, even with ``preserve_order = True`` set on
    the DataContext; when order matters, carry a row number (or the id) and order by it, as ``embed --ray`` does
    (``peft_export.ray.embed_job.write_runs_in_order``). Each row's embedding always stays with its row.
    """
    export, ds, pin = _prepared(
        ds, export, "embedding", {"column": column}, id_column, output_column, batch_size, block_rows,
        {"backend": backend, **(model_options or {})},
        lambda model: model.encode([""], **_encode_options(model, adapter, prompt_name, 1)))
    return _map_on_pool(ds, embedder, batch_size, num_actors, threads_per_actor, num_cpus_per_actor, ray_remote_args,
                        id_column, keep_columns, export=str(export), manifest_sha256=pin, column=column,
                        adapter=adapter, prompt_name=prompt_name, encode_batch_size=encode_batch_size,
                        backend=backend, output_column=output_column, model_options=model_options)


def rerank_dataset(ds, export: str | Path, query_column: str = "query", document_column: str = "document",
                   adapter: str | None = None, prompt_name: str | None = None, prompt: str | None = None,
                   activation_fn: str | None = None, batch_size: int = 256, id_column: str | None = None,
                   num_actors: int | None = None, threads_per_actor: int | None = None, backend: str | None = None,
                   *, apply_softmax: bool = False, num_cpus_per_actor: float | None = None,
                   output_column: str = SCORE_COLUMN, keep_columns: bool = True, predict_batch_size: int = 32,
                   block_rows: int | None = BLOCK_ROWS, scorer: type[BatchScorer] = BatchScorer,
                   model_options: dict[str, Any] | None = None, **ray_remote_args):
    """``ds`` with a ``score`` column: a reranker export's score of each row's (``query_column``,
    ``document_column``) pair, as ``CrossEncoderModel.predict`` gives it (float32; a fixed-size list for a model
    with several labels). ``adapter``, ``prompt_name``, ``prompt``, ``activation_fn`` (a name: "sigmoid",
    "identity", ...) and ``apply_softmax`` are ``predict``'s, checked on the driver (a call on one empty pair)
    before any actor starts; the pool, blocks, ``id_column`` and ``keep_columns`` are
    :func:`embed_dataset`'s, and so is what it says about row order. The export must be a reranker's."""
    options = {key: value for key, value in (("prompt_name", prompt_name), ("prompt", prompt),
                                             ("activation_fn", activation_fn), ("apply_softmax", apply_softmax or None))
               if value is not None}
    export, ds, pin = _prepared(
        ds, export, "reranker", {"query_column": query_column, "document_column": document_column}, id_column,
        output_column, batch_size, block_rows, {"backend": backend, **(model_options or {})},
        lambda model: model.predict([("", "")], **_score_options(model, adapter, 1, options)))
    return _map_on_pool(ds, scorer, batch_size, num_actors, threads_per_actor, num_cpus_per_actor, ray_remote_args,
                        id_column, keep_columns, export=str(export), manifest_sha256=pin,
                        query_column=query_column, document_column=document_column, adapter=adapter,
                        predict_batch_size=predict_batch_size, backend=backend, output_column=output_column,
                        options=options, model_options=model_options)


def _prepared(ds, export: str | Path, task: str, columns: dict[str, str], id_column: str | None,
              output_column: str, batch_size: int, block_rows: int | None, open_options: dict[str, Any], probe):
    """(the export folder, ``ds`` split into blocks of ``block_rows`` (see :func:`embed_dataset`), the digest of the
    export's manifest), after checking here, before any actor opens it, the arguments, that each of ``columns``
    (the job's argument name -> the column it names) holds strings, and that the export is one of ``task``'s and
    takes the job's call: the driver opens it (every file checked against its manifest) and runs ``probe(model)``,
    the call each actor makes, on one empty input, so an unknown adapter, prompt or activation is an error here,
    not a Ray traceback from every actor. The actors open only the export whose manifest has that digest."""
    from ..runtime.config import read_manifest
    from ..tasks import task_of_manifest
    from ..tasks.loading import load

    require("ray.data", "ray")
    require("pyarrow", "ray")
    export = Path(export).expanduser().resolve()
    if not export.is_dir():
        raise ConfigError(f"Export folder not found: {export}")
    found = task_of_manifest(read_manifest(export)).name
    if found != task:
        job = {"embedding": "embed_dataset", "reranker": "rerank_dataset"}
        raise ConfigError(f"{export} is an export of the {found!r} task; {job[task]} takes {task!r} exports"
                          + (f" (use {job[found]})" if found in job else ""))
    for name, value in (("batch_size", batch_size), ("block_rows", 1 if block_rows is None else block_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, found {value!r}")
    schema = ds.schema()
    names = list(schema.names) if schema is not None else []
    for field, name in [*columns.items(), ("id_column", id_column)]:
        if name is not None and name not in names:
            raise ConfigError(f"{field} {name!r} is not a column of the dataset; it has {names}")
    if output_column in names:  # two columns of one name: Ray fails after the whole job has run
        raise ConfigError(f"output_column {output_column!r} is already a column of the dataset; pass another "
                          "output_column= or rename that column first")
    for column in columns.values():
        kind = str(schema.types[names.index(column)])
        if kind not in ("string", "large_string"):
            raise ConfigError(f"Column {column!r} must hold strings, found {kind}; cast it first (e.g. with "
                              "ds.map_batches) or pick another column")
    model = load(export, **{**open_options, "intra_op_threads": 1})  # as the actors open it
    try:
        probe(model)
    except (ValueError, KeyError) as err:  # ConfigError and AdapterNotFoundError are ValueErrors
        if isinstance(err, PeftExportError):
            raise
        raise ConfigError(str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)) from err
    pin = manifest_digest(model.manifest)
    del model
    if block_rows is not None:
        ds = ds.repartition(target_num_rows_per_block=block_rows)
    return export, ds, pin


def _map_on_pool(ds, callable_class, batch_size: int, num_actors: int | None, threads_per_actor: int | None,
                 num_cpus_per_actor: float | None, ray_remote_args: dict[str, Any], id_column: str | None,
                 keep_columns: bool, **constructor_kwargs):
    """``ds.map_batches`` with ``callable_class`` on an actor pool sized by :func:`plan_actors`, each actor built
    with ``constructor_kwargs`` and its thread count; without ``keep_columns``, only ``id_column`` (when given) and
    the output column are kept."""
    actors, threads, reserved = plan_actors(num_actors, threads_per_actor, num_cpus_per_actor)
    from ray.data import ActorPoolStrategy

    out = ds.map_batches(
        callable_class, batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True,
        fn_constructor_kwargs={**constructor_kwargs, "id_column": id_column, "threads": threads},
        compute=ActorPoolStrategy(size=actors), num_cpus=reserved, **ray_remote_args,
    )
    if keep_columns:
        return out
    return out.select_columns([c for c in (id_column, constructor_kwargs["output_column"]) if c is not None])
