"""``peft-export embed --ray``: Ray Data reads the input, :func:`peft_export.ray.embed_dataset` embeds it, Ray
writes Parquet. Thin on purpose: sizing the actor pool and keeping workers torch-free is ``peft_export.ray``'s job.
Not resumable (Ray retries failed tasks itself); the output is a folder of Parquet files in input order."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import InputError, OutputExistsError, require
from .readers import input_format as detect_format
from .writers import EMBEDDING_COLUMN


def _read(ray_data, path: Path, fmt: str):
    if fmt == "parquet":
        return ray_data.read_parquet(str(path))
    if fmt == "csv":
        return ray_data.read_csv(str(path))
    if fmt == "jsonl":
        return ray_data.read_json(str(path), lines=True)
    return ray_data.read_text(str(path))  # one row per line, in a column named "text"


def _clear(output: Path, force: bool) -> None:
    if not output.exists():
        return
    if not force:
        raise OutputExistsError(f"Output {output} already exists; pass --force to replace it")
    if not output.is_dir() or any(p.is_dir() or not (p.suffix == ".parquet" or p.name.startswith("."))
                                  for p in output.iterdir()):
        raise OutputExistsError(f"{output} holds files that are not Parquet output; not deleting it even with "
                                f"--force. Choose another output path")
    shutil.rmtree(output)


def embed_with_ray(export: str, input: str, output: str, *, address: str = "local", column: str = "text",
                   id_column: str | None = None, keep_columns: list[str] | tuple[str, ...] = (),
                   adapter: str | None = None, prompt_name: str | None = None, batch_size: int = 32,
                   input_format: str | None = None, force: bool = False) -> int:
    """Embed ``input`` on Ray into the folder ``output``; returns the number of rows written. ``address``: "local"
    starts a Ray instance on this machine (or joins the one RAY_ADDRESS names), else a cluster's address."""
    source = Path(input)
    if not source.is_file():
        raise InputError(f"Input file not found: {source}")
    fmt = detect_format(source, input_format)
    target = Path(output).expanduser().absolute()
    if target.suffix.lower() in (".npy", ".parquet", ".pq"):
        raise InputError(f"--ray writes a folder of Parquet files; name a folder, not {target.name}")
    if fmt == "text" and (id_column or keep_columns):
        raise InputError("A plain text input has no columns to carry; --id-column and --keep-columns need JSONL, "
                         "CSV or Parquet")
    if EMBEDDING_COLUMN in (id_column, *keep_columns):
        raise InputError("'embedding' is the name of the output's vector column; it cannot be kept or be the id")
    try:
        from peft_export.ray import embed_dataset
    except ImportError as err:
        raise InputError("--ray needs peft_export.ray and Ray Data: pip install 'peft_export[ray]'") from err
    ray = require("ray", "ray")
    ray_data = require("ray.data", "ray")
    _clear(target, force)
    if not ray.is_initialized():
        from peft_export.ray.local import init_ray

        init_ray(None if address == "local" else address)  # a local instance listens on loopback only
    ray_data.DataContext.get_current().execution_options.preserve_order = True  # rows come out in input order
    ds = _read(ray_data, source, fmt)
    ds = embed_dataset(ds, export, column=column, adapter=adapter, prompt_name=prompt_name, batch_size=batch_size,
                       id_column=id_column)
    keep = [name for name in dict.fromkeys(([id_column] if id_column else []) + list(keep_columns))]
    ds = ds.select_columns([*keep, EMBEDDING_COLUMN])
    ds.write_parquet(str(target))
    pq = require("pyarrow.parquet", "corpus")
    return sum(pq.ParquetFile(p).metadata.num_rows for p in target.glob("*.parquet"))
