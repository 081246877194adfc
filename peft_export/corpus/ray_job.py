"""``peft-export embed --ray``: Ray Data reads the input, :func:`peft_export.ray.embed_dataset` embeds it, Ray
writes Parquet. Thin on purpose: sizing the actor pool and keeping workers torch-free is ``peft_export.ray``'s job.
Not resumable (Ray retries failed tasks itself); the output is a folder of Parquet files in input order, marked as
embed's by ``_embed_ray.json`` so that ``--force`` deletes only such a folder.

What can be checked here is checked before Ray starts: the output is not the input and holds nothing else, every
input row is read and checked (named by line, as without Ray), and the adapter and prompt exist in the export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import InputError, OutputExistsError, PeftExportError, require
from .job import check_output_outside_input
from .readers import CorpusReader
from .workers import EncodeSettings, check_settings
from .writers import EMBEDDING_COLUMN, OutputTarget

RAY_MARKER = "_embed_ray.json"


def _read(ray_data, path: Path, fmt: str):
    if fmt == "parquet":
        return ray_data.read_parquet(str(path))
    if fmt == "csv":
        return ray_data.read_csv(str(path))
    if fmt == "jsonl":
        return ray_data.read_json(str(path), lines=True)
    return ray_data.read_text(str(path))  # one row per line, in a column named "text"


def _clear(output: Path, force: bool) -> None:
    """Delete an earlier ``--ray`` output (``force``): only a folder marked as embed's that holds nothing but its
    Parquet files and the marker (no dotfiles, no folders)."""
    if not output.exists():
        return
    if not force:
        raise OutputExistsError(f"Output {output} already exists; pass --force to replace it")
    foreign = [output.name]
    if output.is_dir():
        marked = (output / RAY_MARKER).is_file()
        foreign = [p.name for p in sorted(output.iterdir())
                   if not (marked and p.is_file() and not p.is_symlink()
                           and (p.name == RAY_MARKER or (p.suffix == ".parquet" and not p.name.startswith("."))))]
    if foreign:
        raise OutputExistsError(f"{output} holds files that embed --ray did not write ({', '.join(foreign[:5])}); "
                                f"not deleting it even with --force. Choose another output path")
    shutil.rmtree(output)


def embed_with_ray(export: str, input: str, output: str, *, address: str = "local", column: str = "text",
                   id_column: str | None = None, keep_columns: list[str] | tuple[str, ...] = (),
                   adapter: str | None = None, prompt_name: str | None = None, batch_size: int = 32,
                   input_format: str | None = None, force: bool = False) -> int:
    """Embed ``input`` on Ray into the folder ``output``; returns the number of rows written. ``address``: "local"
    starts a Ray instance on this machine (or joins the one RAY_ADDRESS names), else a cluster's address."""
    output_target = OutputTarget.for_path(output)
    if output_target.kind != "parquet-folder":
        raise InputError(f"--ray writes a folder of Parquet files; name a folder, not {output_target.path.name}")
    if EMBEDDING_COLUMN in (id_column, *keep_columns):
        raise InputError("'embedding' is the name of the output's vector column; it cannot be kept or be the id")
    if not Path(export).is_dir():
        raise PeftExportError(f"Export folder not found: {export}")
    reader = CorpusReader(input, column, id_column, tuple(keep_columns), input_format)
    source, fmt, target = reader.path, reader.format, output_target.path
    check_output_outside_input(source, output_target)
    if target.exists() and not force:
        raise OutputExistsError(f"Output {target} already exists; pass --force to replace it")
    reader.scan()  # a bad row is named by its line here, not in Ray tracebacks from a worker
    settings = EncodeSettings(str(export), adapter, prompt_name, batch_size, threads=1)
    check_settings(settings.open_model(), settings)  # an adapter name on a merged export, an unknown prompt
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
    try:
        ds.write_parquet(str(target))
    except Exception as err:  # a RayTaskError wraps the worker's error: its last line, not Ray's traceback
        cause = getattr(err, "cause", None) or err
        last = (str(cause).strip().splitlines() or [""])[-1]
        raise PeftExportError(f"the Ray job failed: {type(cause).__name__}: {last}") from err
    (target / RAY_MARKER).write_text(json.dumps({"input": str(source.absolute()), "export": str(export)}) + "\n",
                                     encoding="utf-8")
    pq = require("pyarrow.parquet", "corpus")
    return sum(pq.ParquetFile(p).metadata.num_rows for p in target.glob("*.parquet"))
