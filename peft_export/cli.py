"""The ``peft-export`` command. Each handler imports its heavy dependencies lazily."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import PeftExportError

DEFAULT_OUTPUT_SUFFIX = "-onnx"


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_id", nargs="?", default=None,
        help="local folder or Hugging Face Hub id: a Sentence Transformers model, a transformers encoder, or an "
             "adapter-only folder/repo. Omitted: the bundled all-MiniLM-L6-v2 with the bundled demo adapter.",
    )
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH_OR_ID",
                        help="PEFT LoRA adapter to apply (folder or hub id)")
    parser.add_argument("--base", help="base model for an adapter-only MODEL_ID (default: its base_model_name_or_path)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) of MODEL_ID")
    parser.add_argument("--base-revision", help="hub revision of the base model")
    parser.add_argument("-o", "--output", help="output folder (default: ./<model name>-onnx)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    parser.add_argument("--max-seq-length", type=int, help="truncate inputs to this many tokens")
    parser.add_argument("--pooling", help="pooling mode(s) for a plain encoder without a Pooling config, e.g. mean, cls")
    norm = parser.add_mutually_exclusive_group()
    norm.add_argument("--normalize", dest="normalize", action="store_true", default=None,
                      help="L2-normalise sentence embeddings (default: as the Sentence Transformers config says)")
    norm.add_argument("--no-normalize", dest="normalize", action="store_false")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the repository")
    parser.add_argument("--allow-noop-adapter", action="store_true",
                        help="export even if the adapter does not change the embeddings")
    parser.add_argument("--token", help="Hugging Face token for private repositories")
    parser.add_argument("--switchable", action="store_true",
                        help="keep adapters separate: one base graph with LoRA branches plus one weight file per "
                             "--adapter, switched per call at run time")
    parser.add_argument("--default-adapter", metavar="NAME",
                        help="with --switchable: the adapter active when the export is loaded (default: none, the base)")


def _default_model(args: argparse.Namespace) -> None:
    """No MODEL_ID: the bundled base model plus the bundled demo adapter, fully offline."""
    from .demo import DEMO_ADAPTER_DIR, bundled_base_model_path

    args.model_id = str(DEMO_ADAPTER_DIR)
    if not args.base:
        args.base = str(bundled_base_model_path())
    if not args.output:
        args.output = "all-MiniLM-L6-v2-demo-onnx"


def _cmd_merge_onnx(args: argparse.Namespace) -> int:
    from .export.pipeline import ExportOptions, run_onnx_export

    if args.model_id is None:
        _default_model(args)
    output = args.output or Path(args.model_id.rstrip("/")).name + DEFAULT_OUTPUT_SUFFIX
    options = ExportOptions(
        model_id=args.model_id, output=output, adapters=args.adapter, base=args.base, revision=args.revision,
        base_revision=args.base_revision, token=args.token, force=args.force, opset=args.opset,
        max_seq_length=args.max_seq_length, pooling=args.pooling, normalize=args.normalize,
        trust_remote_code=args.trust_remote_code, allow_noop_adapter=args.allow_noop_adapter,
        switchable=args.switchable, default_adapter=args.default_adapter,
    )
    result = run_onnx_export(options, log=lambda msg: print(msg, flush=True))
    print(f"done: {Path(result.path).absolute()}")
    print(f"try it: peft-export encode {result.path} \"a sentence to embed\"")
    return 0


def _cmd_add_adapter(args: argparse.Namespace) -> int:
    from .export.switchable import add_adapter

    entry = add_adapter(args.path, args.adapter, base=args.base, force=args.force,
                        allow_noop_adapter=args.allow_noop_adapter, trust_remote_code=args.trust_remote_code,
                        token=args.token, log=lambda msg: print(msg, flush=True))
    print(f"done: {entry['name']} -> {Path(args.path) / entry['file']}")
    return 0


def _cmd_remove_adapter(args: argparse.Namespace) -> int:
    from .export.switchable import remove_adapter

    remove_adapter(args.path, args.name, log=lambda msg: print(msg, flush=True))
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from .runtime.model import EmbeddingModel

    model = EmbeddingModel(args.path, device=args.device)
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin]
    embeddings = model.encode(texts, prompt_name=args.prompt_name, normalize_embeddings=args.normalize,
                              adapter=args.adapter)
    if args.json:
        print(json.dumps([e.tolist() for e in embeddings]))
        return 0
    np.set_printoptions(precision=4, suppress=True, linewidth=120)
    for text, emb in zip(texts, embeddings):
        print(f"{text[:60]!r}: dim={emb.shape[0]} norm={np.linalg.norm(emb):.4f} {emb[:6]}...")
    if len(texts) > 1:
        print(f"similarity ({model.similarity_fn_name}):")
        print(model.similarity(embeddings, embeddings))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .runtime.config import RuntimeConfig, read_manifest

    path = Path(args.path)
    manifest = read_manifest(path)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    config = RuntimeConfig.load(path)
    print(f"export:      {path.absolute()} ({manifest.get('size_bytes', 0) / 1e6:.1f} MB, "
          f"{manifest['export']['format']} opset {manifest['export'].get('opset')})")
    print(f"base:        {manifest['base']['id']} (revision {manifest['base'].get('revision')})")
    for adapter in manifest.get("adapters", []):
        digest = next(iter(adapter["sha256"].values()))[:12]
        print(f"adapter:     {adapter['name']} <- {adapter['source']} r={adapter['r']} "
              f"alpha={adapter['lora_alpha']} sha256={digest}...")
    print(f"merge mode:  {manifest['merge_mode']}")
    if manifest["merge_mode"] == "switchable":
        print(f"switchable:  {len(config.lora_slots)} LoRA branches, default adapter: "
              f"{manifest.get('default_adapter') or 'none (base)'}")
    print(f"pipeline:    pooling={config.pooling_modes} normalize={config.normalize} dim={config.dimension} "
          f"max_seq_length={config.max_seq_length} similarity={config.similarity_fn_name}")
    onnx_check = manifest.get("validation", {}).get("onnx_vs_reference", {})
    if onnx_check:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in onnx_check["max_abs_diff"].items())
        print(f"validation:  max abs diff vs PyTorch: {diffs}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-export",
        description="Export LoRA-adapted sentence-embedding models to ONNX and run them without torch.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge-onnx", help="merge a LoRA adapter into its base and export one ONNX graph",
                           description="Resolve MODEL_ID, merge the LoRA adapter with PEFT, export encoder + pooling "
                                       "+ Dense + Normalize as one ONNX graph, validate it numerically and write "
                                       "a manifest.")
    _add_export_arguments(merge)
    merge.set_defaults(handler=_cmd_merge_onnx)

    enc = sub.add_parser("encode", help="embed sentences with an export folder (no torch)")
    enc.add_argument("path", help="export folder")
    enc.add_argument("texts", nargs="*", help="sentences (default: one per line from stdin)")
    enc.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    enc.add_argument("--prompt-name", help="name of a prompt from the model's config")
    enc.add_argument("--normalize", action="store_true", help="L2-normalise the output")
    enc.add_argument("--json", action="store_true", help="print embeddings as JSON")
    enc.add_argument("--adapter", metavar="NAME", help="switchable exports: the adapter to encode with")
    enc.set_defaults(handler=_cmd_encode)

    add = sub.add_parser("add-adapter", help="add a PEFT LoRA adapter to a switchable export (graph untouched)",
                         description="Convert a PEFT LoRA adapter for an existing switchable export, validate it "
                                     "against eager PEFT and the merged model on the export's base, and add its "
                                     "weight file. A rejected adapter leaves the folder unchanged.")
    add.add_argument("path", help="switchable export folder")
    add.add_argument("adapter", metavar="NAME=PATH_OR_ID", help="adapter name and PEFT adapter folder or hub id")
    add.add_argument("--base", help="where the export's base model is now (default: as recorded in the manifest)")
    add.add_argument("--force", action="store_true", help="replace an adapter of the same name")
    add.add_argument("--allow-noop-adapter", action="store_true",
                     help="add it even if it does not change the embeddings or duplicates another adapter")
    add.add_argument("--trust-remote-code", action="store_true", help="allow model code from the base's repository")
    add.add_argument("--token", help="Hugging Face token for private repositories")
    add.set_defaults(handler=_cmd_add_adapter)

    rm = sub.add_parser("remove-adapter", help="remove an adapter from a switchable export (graph untouched)")
    rm.add_argument("path", help="switchable export folder")
    rm.add_argument("name", help="adapter name")
    rm.set_defaults(handler=_cmd_remove_adapter)

    info = sub.add_parser("info", help="summarise an export folder's manifest")
    info.add_argument("path", help="export folder")
    info.add_argument("--json", action="store_true", help="print the whole manifest")
    info.set_defaults(handler=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except PeftExportError as err:
        print(f"peft-export: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
