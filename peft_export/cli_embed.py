"""``peft-export embed``: its arguments and its handler (cli.py only registers it). Nothing heavy at import."""

from __future__ import annotations

import argparse
import sys


def _columns(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def add_embed_parser(sub) -> None:
    embed = sub.add_parser(
        "embed", help="embed a corpus file (JSONL, CSV, Parquet, text) into Parquet or .npy; resumable",
        description="Embed one column of INPUT (JSONL, CSV, Parquet, or text with one text per line) with the export "
                    "folder EXPORT, streaming, and write the vectors to OUTPUT: a folder of Parquet parts, one "
                    "FILE.parquet, or FILE.npy (vectors only, in input order). Parquet rows hold the id column, the "
                    "kept columns and `embedding` (fixed-size float32 list). Output is written in numbered parts "
                    "with a state file, so running the same command again after a kill continues where it stopped; "
                    "the result equals an uninterrupted run exactly. Parquet needs peft_export[corpus].")
    embed.add_argument("export", help="export folder (merge-onnx / merge-openvino output)")
    embed.add_argument("input", help="corpus file: .jsonl/.ndjson, .csv, .parquet or .txt (see --input-format)")
    embed.add_argument("-o", "--output", required=True,
                       help="DIR (a folder of Parquet parts), FILE.parquet (one file) or FILE.npy")
    embed.add_argument("--column", default="text", help="column (JSONL field) holding the texts (default: text)")
    embed.add_argument("--id-column", help="column to carry into the output under its own name, e.g. a document id")
    embed.add_argument("--keep-columns", type=_columns, action="extend", default=[], metavar="A,B",
                       help="more input columns to carry into the output (comma-separated; repeatable)")
    embed.add_argument("--adapter", metavar="NAME", help="switchable exports: the adapter to embed with")
    embed.add_argument("--prompt-name", help="name of a prompt from the model's config (e.g. 'document')")
    embed.add_argument("--batch-size", type=int, default=32, help="texts per model run (default: 32)")
    embed.add_argument("--part-rows", type=int, default=None,
                       help="rows per output part, the unit of resumption (default: 4096)")
    embed.add_argument("--processes", type=int,
                       help="worker processes, one model each (default: one per core, at most 8, fewer when "
                            "memory or the work is short; 1 on one core; see docs/scaling.md)")
    embed.add_argument("--threads", type=int,
                       help="ONNX Runtime / OpenVINO threads per process (default: all cores with one process, "
                            "1 with several)")
    embed.add_argument("--input-format", choices=["jsonl", "csv", "parquet", "text"],
                       help="input format (default: from the file's suffix)")
    embed.add_argument("--force", action="store_true",
                       help="discard an existing output (or the parts of another job) and start again")
    embed.add_argument("--quiet", action="store_true", help="no progress bar (it is off anyway when stderr is not "
                                                            "a terminal)")
    embed.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on Ray Data instead: a local Ray instance, or the cluster at ADDRESS (needs "
                            "peft_export[ray]); writes a folder of Parquet files, not resumable. Put it after the "
                            "positional arguments, or write --ray=ADDRESS")
    embed.set_defaults(handler=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    if args.ray is not None:
        from .ray.embed_job import embed_with_ray

        rows = embed_with_ray(args.export, args.input, args.output, address=args.ray, column=args.column,
                              id_column=args.id_column, keep_columns=args.keep_columns, adapter=args.adapter,
                              prompt_name=args.prompt_name, batch_size=args.batch_size,
                              input_format=args.input_format, force=args.force)
        print(f"embedded {rows:,} texts with Ray into {args.output}", file=sys.stderr)
        return 0

    from .corpus.job import DEFAULT_PART_ROWS, embed_corpus

    result = embed_corpus(
        args.export, args.input, args.output, column=args.column, id_column=args.id_column,
        keep_columns=args.keep_columns, adapter=args.adapter, prompt_name=args.prompt_name,
        batch_size=args.batch_size, part_rows=args.part_rows or DEFAULT_PART_ROWS, processes=args.processes,
        threads=args.threads, input_format=args.input_format, force=args.force,
        progress=False if args.quiet else None, log=lambda msg: print(msg, file=sys.stderr),
    )
    if result.seconds == 0.0 and result.resumed_rows == result.rows:
        print(f"{result.output} is already complete ({result.rows:,} texts); nothing to do", file=sys.stderr)
        return 0
    resumed = f", {result.resumed_rows:,} of them from an earlier run" if result.resumed_rows else ""
    if result.empty_rows:
        resumed += f" ({result.empty_rows:,} of them empty)"
    print(f"embedded {result.rows:,} texts{resumed} into {result.output} in {result.seconds:.1f} s "
          f"({result.texts_per_second:.1f} texts/s; {result.startup_seconds:.1f} s of it checking the input and "
          f"loading the model)", file=sys.stderr)
    return 0
