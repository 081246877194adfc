"""The ``peft-export`` command. Each handler imports its heavy dependencies lazily."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import ConfigError, PeftExportError
from .methods import method_names

DEFAULT_OUTPUT_SUFFIX = "-onnx"
OPENVINO_OUTPUT_SUFFIX = "-openvino"
EXIT_ERROR = 2  # every error of ours and every usage error (argparse's own code)
EXIT_OUTPUT_CLOSED = 1  # stdout closed early (`| head`): what Python's docs recommend for BrokenPipeError
EXIT_INTERRUPTED = 130


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser that takes options anywhere, also after positional texts (`encode EXPORT "a" --json`):
    argparse's intermixed parsing, which cannot run on the top-level parser itself because it has subcommands."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _add_export_arguments(parser: argparse.ArgumentParser, output_suffix: str = DEFAULT_OUTPUT_SUFFIX) -> None:
    """Options shared by merge-onnx and merge-openvino; the ONNX-only ones (opset, fusion, dtype) only for ONNX."""
    onnx = output_suffix == DEFAULT_OUTPUT_SUFFIX
    parser.add_argument(
        "model_id", nargs="?", default=None,
        help="local folder or Hugging Face Hub id: a Sentence Transformers model, a transformers encoder, or an "
             "adapter-only folder/repo. Omitted: the bundled all-MiniLM-L6-v2 with the bundled demo adapter.",
    )
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH_OR_ID",
                        help=f"PEFT {method_names()} adapter to apply (folder or hub id)")
    parser.add_argument("--base", help="base model for an adapter-only MODEL_ID (default: its base_model_name_or_path)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) of MODEL_ID")
    parser.add_argument("--base-revision", help="hub revision of the base model")
    parser.add_argument("-o", "--output", help=f"output folder (default: ./<model name>{output_suffix})")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    if onnx:
        parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
        parser.add_argument("--no-fuse-attention", dest="fuse_attention", action="store_false",
                            help="keep the graph as torch.onnx traced it (default: fuse each attention block into "
                                 "ONNX Runtime's Attention operator when that validates; ~10%% faster at batch 1)")
    parser.add_argument("--max-seq-length", type=int, help="truncate inputs to this many tokens")
    parser.add_argument("--pooling",
                        help="pooling mode(s) for a plain encoder without a Pooling config, e.g. mean, cls")
    norm = parser.add_mutually_exclusive_group()
    norm.add_argument("--normalize", dest="normalize", action="store_true", default=None,
                      help="L2-normalise sentence embeddings (default: as the Sentence Transformers config says)")
    norm.add_argument("--no-normalize", dest="normalize", action="store_false")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the repository")
    parser.add_argument("--allow-noop-adapter", action="store_true",
                        help="export even if the adapter does not change the embeddings")
    parser.add_argument("--token", help="Hugging Face token for private repositories")
    parser.add_argument("--switchable", action="store_true",
                        help="keep adapters separate: one base graph with LoRA branches plus one weight file "
                             "per --adapter NAME=PATH, switched per call at run time")
    parser.add_argument("--default-adapter", metavar="NAME",
                        help="with --switchable: the adapter active when the export is loaded (default: none)")
    parser.add_argument("--stack-adapters", action="store_true",
                        help="merge every --adapter into one model, all active at once (PEFT's set_adapter([a, b]) "
                             "then merge_and_unload); adapters of one PEFT method; not with --switchable")
    quant = parser.add_argument_group(
        "quantization (int8 graphs must pass a quality gate against fp32)" if onnx
        else "quantization and quality gate (fp16 / int8 models must pass it against fp32; fp16 needs mean cosine "
             ">= 0.999)")
    if onnx:
        quant.add_argument("--quantize", choices=["int8", "int8-static"],
                           help="int8: dynamic, per-channel weights; int8-static: also calibrated activations")
        quant.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                           help="fp16: half-precision graph for the CUDA execution provider (LayerNorm, Softmax "
                                "and pooling kept fp32), gated against fp32 with mean cosine >= 0.999")
    else:
        quant.add_argument("--quantize", choices=["int8-static"],
                           help="int8-static: int8 weights and activations (NNCF, calibrated on real text); the "
                                "matrix products run in int8. --weight-format int8 compresses the weights only")
    quant.add_argument("--gate-data", help="JSON lines of {\"query\", \"passage\"} pairs for the quality gate "
                                           "(default: the demo corpus' held-out pairs)")
    quant.add_argument("--calibration-data", help="text file, one sentence per line, for int8-static calibration "
                                                  "(default: 300 texts of the demo corpus' training pairs)")
    quant.add_argument("--min-mean-cosine", type=float, default=0.99, help="gate: mean cosine to fp32 (0.99)")
    quant.add_argument("--min-worst-cosine", type=float, default=0.97, help="gate: worst sentence's cosine (0.97)")
    quant.add_argument("--min-ndcg-retention", type=float, default=0.995,
                       help="gate: NDCG@10 of int8 divided by fp32's (0.995)")
    quant.add_argument("--max-score-diff", type=float, default=0.05,
                       help="reranker gate: largest score difference to fp32 (0.05)")
    quant.add_argument("--max-mean-score-diff", type=float, default=0.01,
                       help="reranker gate: mean score difference to fp32 (0.01)")
    quant.add_argument("--min-spearman", type=float, default=0.99,
                       help="reranker gate: Spearman correlation of the gate pairs' scores with fp32's (0.99)")
    quant.add_argument("--min-top10-overlap", type=float, default=0.9,
                       help="reranker gate: share of fp32's 10 best-scored gate pairs among the lossy model's (0.9)")


def _default_model(args: argparse.Namespace) -> None:
    """No MODEL_ID: the bundled base model plus the bundled demo adapter, fully offline."""
    from .demo import DEMO_ADAPTER_DIR, bundled_base_model_path

    args.model_id = str(DEMO_ADAPTER_DIR)
    if not args.base:
        args.base = str(bundled_base_model_path())
    if not args.output:
        args.output = "all-MiniLM-L6-v2-demo-onnx"


def _export_options(args: argparse.Namespace, output_suffix: str):
    from .export.pipeline import ExportOptions
    from .export.gate import QualityGate

    if args.model_id is None:
        named_output = args.output
        _default_model(args)
        if not named_output:
            args.output = args.output.removesuffix(DEFAULT_OUTPUT_SUFFIX) + output_suffix
    output = args.output or Path(args.model_id.rstrip("/")).name + output_suffix
    return ExportOptions(
        model_id=args.model_id, output=output, adapters=args.adapter, base=args.base, revision=args.revision,
        base_revision=args.base_revision, token=args.token, force=args.force,
        opset=getattr(args, "opset", ExportOptions.opset), max_seq_length=args.max_seq_length,
        pooling=args.pooling, normalize=args.normalize, trust_remote_code=args.trust_remote_code,
        allow_noop_adapter=args.allow_noop_adapter, quantize=getattr(args, "quantize", None),
        dtype=getattr(args, "dtype", "fp32"), fuse_attention=getattr(args, "fuse_attention", True),
        gate_data=args.gate_data, calibration_data=getattr(args, "calibration_data", None),
        gate=QualityGate(**{name: getattr(args, name) for name in QualityGate.__dataclass_fields__}),
        switchable=getattr(args, "switchable", False), default_adapter=getattr(args, "default_adapter", None),
        stack_adapters=getattr(args, "stack_adapters", False),
    )


def _print_done(result) -> None:
    print(f"done: {Path(result.path).absolute()}")
    print(f"try it: {result.resolved.task.try_it.format(path=result.path)}")


def _cmd_merge_onnx(args: argparse.Namespace) -> int:
    from .export.api import run_onnx_export
    from .export.quiet import third_party_quiet

    options = _export_options(args, DEFAULT_OUTPUT_SUFFIX)
    with third_party_quiet():  # our progress lines only, not the libraries' bars and deprecation notices
        result = run_onnx_export(options, log=lambda msg: print(msg, flush=True))
    _print_done(result)
    return 0


def _cmd_merge_openvino(args: argparse.Namespace) -> int:
    from .export.api import run_openvino_export
    from .export.quiet import third_party_quiet

    options = _export_options(args, OPENVINO_OUTPUT_SUFFIX)
    with third_party_quiet():
        result = run_openvino_export(options, args.weight_format, log=lambda msg: print(msg, flush=True))
    _print_done(result)
    return 0


def _cmd_add_adapter(args: argparse.Namespace) -> int:
    from .export.quiet import third_party_quiet
    from .export.switchable_changes import add_adapter

    with third_party_quiet():
        entry = add_adapter(args.path, args.adapter, base=args.base, force=args.force,
                            allow_noop_adapter=args.allow_noop_adapter, trust_remote_code=args.trust_remote_code,
                            token=args.token, log=lambda msg: print(msg, flush=True))
    print(f"done: {entry['name']} -> {Path(args.path) / entry['file']}")
    return 0


def _cmd_remove_adapter(args: argparse.Namespace) -> int:
    from .export.switchable_folder import remove_adapter  # torch-free: no graph is touched

    remove_adapter(args.path, args.name, log=lambda msg: print(msg, flush=True))
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from .runtime.model import EmbeddingModel

    model = EmbeddingModel(args.path, device=args.device, backend=args.backend,
                           inference_precision=args.inference_precision)
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


def _cmd_rerank(args: argparse.Namespace) -> int:
    from .runtime.reranker_model import CrossEncoderModel

    model = CrossEncoderModel(args.path, device=args.device, backend=args.backend)
    passages = args.passages or [line.rstrip("\n") for line in sys.stdin]
    ranked = model.rank(args.query, passages, top_k=args.top_k, return_documents=True, adapter=args.adapter,
                        prompt_name=args.prompt_name, prompt=args.prompt)
    if args.json:
        print(json.dumps(ranked))
        return 0
    for result in ranked:
        print(f"{result['score']:.4f}  [{result['corpus_id']}] {result['text'][:80]!r}")
    return 0



def _setting(value) -> str:
    """One task setting on one line: a chat template (a dict of texts) by its size, a long text cut."""
    if isinstance(value, dict):
        return f"<{sum(len(str(v)) for v in value.values())} characters>"
    if isinstance(value, str) and (len(value) > 40 or not value.isprintable() or " " in value):
        return repr(value) if len(value) <= 40 else repr(value[:37] + "...")
    return str(value)


def _cmd_info(args: argparse.Namespace) -> int:
    from .runtime.config import RuntimeConfig, read_manifest
    from .tasks import task_of_manifest

    path = Path(args.path)
    manifest = read_manifest(path)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    task = task_of_manifest(manifest)
    config = RuntimeConfig.load(path, manifest, task.runtime_config_file)
    export = manifest["export"]
    detail = (f"opset {export.get('opset')}" if export["format"] == "onnx"
              else f"{export.get('weight_format')} weights")
    print(f"export:      {path.absolute()} ({manifest.get('size_bytes', 0) / 1e6:.1f} MB, "
          f"{export['format']} {detail})")
    print(f"base:        {manifest['base']['id']} ({_base_origin(manifest['base'])})")
    if not manifest.get("adapters"):
        print("adapter:     none (the base model as it is; no adapter was applied)")
    for adapter in manifest.get("adapters", []):
        digest = next(iter(adapter["sha256"].values()))[:12]
        sizes = (f"r={adapter['r']} alpha={adapter['lora_alpha']}" if "r" in adapter and "lora_alpha" in adapter
                 else f"peft_type={adapter.get('peft_type')}")  # LoRA's manifests predate peft_type
        print(f"adapter:     {adapter['name']} <- {adapter['source']} {sizes} sha256={digest}...")
    print(f"task:        {task.name} ({task.sentence_transformers_class})")
    stacked = manifest.get("stacked_adapters")
    print(f"merge mode:  {manifest['merge_mode']}" + (f" (stacked: {' + '.join(stacked)}, all active)" if stacked
                                                      else ""))
    if manifest["merge_mode"] == "switchable":
        print(f"switchable:  {len(config.lora_slots)} LoRA branches, default adapter: "
              f"{manifest.get('default_adapter') or 'none (base)'}")
    if config.task_config:  # a task with settings of its own (a reranker: num_labels, activation_fn)
        settings = " ".join(f"{key}={_setting(value)}" for key, value in config.task_config.items()
                            if key not in ("prompts", "default_prompt_name", "id2label"))
        print(f"pipeline:    {settings} max_seq_length={config.max_seq_length}")
        prompts, default = config.task_config.get("prompts") or {}, config.task_config.get("default_prompt_name")
        if prompts:  # a reranker's prompts by name (predict(prompt_name=...), rerank --prompt-name)
            print("prompts:     " + ", ".join(f"{name} (default)" if name == default else name for name in prompts))
        if isinstance(config.task_config.get("id2label"), dict):  # a reranker's label names (TEI's /predict)
            print(f"labels:      {', '.join(map(str, config.task_config['id2label'].values()))}")
    else:
        print(f"pipeline:    pooling={config.pooling_modes} normalize={config.normalize} dim={config.dimension} "
              f"max_seq_length={config.max_seq_length} similarity={config.similarity_fn_name}")
    validation = manifest.get("validation", {})
    graph_check = validation.get("onnx_vs_reference") or validation.get("openvino_vs_reference") or {}
    if graph_check:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in graph_check["max_abs_diff"].items())
        print(f"validation:  max abs diff vs PyTorch: {diffs}")
    gate = validation.get("weight_compression") or validation.get("quantization")
    if gate:
        what = "weights and activations" if gate.get("activations") == "int8" else "weights"
        print(f"quality:     {gate['weight_format']} {what} vs fp32: {task.gate.describe(gate)}")
    return 0


def _base_origin(base: dict) -> str:
    """Where the base's weights came from: a hub revision, or a local folder (which has no revision)."""
    if base.get("revision"):
        return f"revision {base['revision']}"
    if base.get("local_copy"):
        return f"local copy from {base['local_copy']}"
    base_id = str(base.get("id", ""))
    if base_id.startswith((".", "/", "~")) or Path(base_id).expanduser().is_dir():
        return "local folder"
    return "revision not recorded"


def _cmd_bench(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from .bench.run import run_bench_command
    from .export.quiet import third_party_quiet

    with third_party_quiet() if args.eager else nullcontext():  # --eager loads models with transformers
        return run_bench_command(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .serve import ServeSettings, create_app, run_server
    from .serve.server import listening_socket
    from .serve.settings import LIMIT_FLAGS

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exports = _serve_exports(args.paths)
    if len(exports) > 1 and args.served_model_name:
        raise ConfigError("--served-model-name names the one export served; with several, name each one as "
                          "NAME=PATH")
    settings = ServeSettings(
        served_model_name=None if len(exports) > 1 else args.served_model_name or next(iter(exports)),
        default_adapter=args.default_adapter, auto_truncate=args.auto_truncate,
        merged_adapter_budget=args.merged_adapter_budget,
        **{field: getattr(args, field) for field, _, _ in LIMIT_FLAGS},
    )
    from .tasks.loading import load

    # The class of each export's task (EmbeddingModel, CrossEncoderModel); the app serves those tasks' routes.
    models = {name: load(path, device=args.device, intra_op_threads=args.intra_op_threads)
              for name, path in exports.items()}
    if args.merge_adapter:
        _merge_served_adapters(models, args.merge_adapter)
    app = create_app(models if len(models) > 1 else next(iter(models.values())), settings)
    sock = listening_socket(args.host, args.port)  # --port 0: the port the system picked is announced
    host = f"[{args.host}]" if ":" in args.host else args.host
    names = [name for server in app.state.group.servers for name in server.served.names]
    print(f"serving {', '.join(names)} on http://{host}:{sock.getsockname()[1]}", flush=True)
    run_server(app, args.host, args.port, graceful_timeout_s=args.graceful_timeout, log_level=args.log_level,
               sock=sock)
    return 0


def _serve_exports(specs: list[str]) -> dict[str, Path]:
    """``serve``'s export arguments, PATH or NAME=PATH, as {name: folder}; a PATH is named by its folder. An
    argument that is an existing folder is a PATH even where it holds "=". Two exports under one name: refused."""
    exports: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not path or Path(spec).is_dir():
            name, path = Path(spec).resolve().name, spec
        if not name:
            raise ConfigError(f"{spec!r}: give the export as PATH or NAME=PATH, with a non-empty NAME")
        if name in exports:
            raise ConfigError(f"Two exports are served as {name!r} ({exports[name]} and {path}); name them apart "
                              "with NAME=PATH")
        exports[name] = Path(path)
    return exports


def _merge_served_adapters(models: dict, requested: list[str]) -> None:
    """--merge-adapter: each NAME in the export that has it ("all": every adapter of every export); with one export,
    the model's own merge_adapter says which names it lacks."""
    if len(models) == 1:
        model = next(iter(models.values()))
        model.merge_adapter(model.list_adapters() if "all" in requested else requested)
        print(f"merged into their own sessions: {', '.join(model.merged_adapters())}", flush=True)
        return
    unknown = [n for n in requested if n != "all" and not any(n in m.list_adapters() for m in models.values())]
    if unknown:
        have = [a for m in models.values() for a in m.list_adapters()]
        raise ConfigError(f"--merge-adapter {unknown[0]!r}: no served export has that adapter; they have "
                          f"{', '.join(map(repr, have)) or 'none'}")
    for model in models.values():
        names = [n for n in model.list_adapters() if "all" in requested or n in requested]
        if names:
            model.merge_adapter(names)
            print(f"merged into their own sessions: {', '.join(model.merged_adapters())}", flush=True)


def _add_serve_parser(sub) -> None:
    from .serve.settings import add_limit_arguments, port_number  # light: no Starlette, no uvicorn

    serve = sub.add_parser("serve", help="serve export folders over HTTP (OpenAI and TEI routes; rerank routes "
                                         "for a reranker export)",
                           description="Serve one or more export folders over HTTP with dynamic batching: POST "
                                       "/v1/embeddings (OpenAI), POST /embed and /similarity (text-embeddings-"
                                       "inference) for embedders, POST /v1/rerank and /rerank for rerankers, "
                                       "GET /v1/models, /health, /live, /metrics. Several exports (an embedder and a "
                                       "reranker) each get their own batcher; a request's `model` picks one. Needs "
                                       "peft_export[serve].")
    serve.add_argument("paths", nargs="+", metavar="[NAME=]PATH",
                       help="export folder; several for one server (each served as NAME, default: its folder's name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=port_number, default=8080,
                       help="port, 0-65535 (default: 8080; 0: any free port, the one chosen is printed)")
    serve.add_argument("--served-model-name", help="name of the base model in `model` (default: the folder's name)")
    serve.add_argument("--default-adapter", metavar="NAME", help="adapter the TEI routes use when `model` is absent")
    serve.add_argument("--merge-adapter", action="append", metavar="NAME",
                       help="run this adapter of a switchable export from its own session with the LoRA update merged "
                            "in: merged-export speed for hot adapters, ~50 MB more memory each for MiniLM (repeat; "
                            "'all' for every adapter; ONNX Runtime only)")
    serve.add_argument("--merged-adapter-budget", type=int, metavar="N",
                       help="keep the N most requested adapters merged (LRU eviction, ~50 MB each for MiniLM); "
                            "the others run through the LoRA branches with the same answers. Adapters named by "
                            "--merge-adapter stay merged on top of N (ONNX Runtime only)")
    serve.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    serve.add_argument("--intra-op-threads", type=int, help="ONNX Runtime threads (default: all physical cores)")

    add_limit_arguments(serve, "limits and batching")
    serve.add_argument("--graceful-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM (default: 30)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-export",
        description=f"Export {method_names()}-adapted sentence-embedding models to ONNX or OpenVINO and run them "
                    "without torch.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)

    merged, switchable = method_names("merged"), method_names("switchable")  # the registry's methods, for help
    merge = sub.add_parser("merge-onnx", help=f"merge a {merged} adapter into its base and export one ONNX graph",
                           description=f"Resolve MODEL_ID, merge the {merged} adapter with PEFT, export encoder + "
                                       "pooling + Dense + Normalize as one ONNX graph, validate it numerically and "
                                       "write a manifest.")
    _add_export_arguments(merge)
    merge.set_defaults(handler=_cmd_merge_onnx)

    merge_ov = sub.add_parser(
        "merge-openvino", help=f"merge a {merged} adapter into its base and export OpenVINO IR (.xml + .bin)",
        description="Same resolution, merge and validation as merge-onnx, writing OpenVINO IR with pooling, Dense "
                    "and Normalize folded in and dynamic batch/sequence dimensions. fp16 and int8 (NNCF) weights "
                    "must pass the quality gate against the fp32 model.",
    )
    _add_export_arguments(merge_ov, OPENVINO_OUTPUT_SUFFIX)
    merge_ov.add_argument("--weight-format", choices=["fp32", "fp16", "int8", "int4"], default="fp32",
                          help="weight storage: fp32 (default, exact), fp16 (half size), int8 (NNCF, quarter size), "
                               "int4 (NNCF, groups of input channels; for decoder-size models). Lossy formats must "
                               "pass the quality gate")
    merge_ov.set_defaults(handler=_cmd_merge_openvino)

    enc = sub.add_parser("encode", help="embed sentences with an export folder (no torch)")
    enc.add_argument("path", help="export folder")
    enc.add_argument("texts", nargs="*", help="sentences (default: one per line from stdin)")
    enc.add_argument("--backend", choices=["onnxruntime", "openvino"],
                     help="runtime (default: the one the folder was exported for)")
    enc.add_argument("--device", default="cpu",
                     help="cpu or cuda (onnxruntime); CPU, GPU or AUTO (openvino). Default: cpu")
    enc.add_argument("--inference-precision", choices=["f32", "bf16", "f16"],
                     help="openvino only: arithmetic precision (default f32, exact)")
    enc.add_argument("--prompt-name", help="name of a prompt from the model's config")
    enc.add_argument("--normalize", action="store_true", help="L2-normalise the output")
    enc.add_argument("--json", action="store_true", help="print embeddings as JSON")
    enc.add_argument("--adapter", metavar="NAME", help="switchable exports: the adapter to encode with")
    enc.set_defaults(handler=_cmd_encode)

    rr = sub.add_parser("rerank", help="rank passages for a query with a reranker export folder (no torch)")
    rr.add_argument("path", help="reranker export folder")
    rr.add_argument("query", help="the query")
    rr.add_argument("passages", nargs="*", help="passages to rank (default: one per line from stdin)")
    rr.add_argument("--top-k", type=int, help="print only the best K (default: all)")
    rr.add_argument("--backend", choices=["onnxruntime", "openvino"],
                    help="runtime (default: the one the folder was exported for)")
    rr.add_argument("--device", default="cpu",
                    help="cpu or cuda (onnxruntime); CPU, GPU or AUTO (openvino). Default: cpu")
    rr.add_argument("--json", action="store_true", help="print the ranking as JSON (corpus_id, score, text)")
    rr.add_argument("--adapter", metavar="NAME", help="switchable exports: the adapter to score with")
    prompt = rr.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-name", metavar="NAME",
                        help="one of the model's prompts (default: its default_prompt_name's, if any)")
    prompt.add_argument("--prompt", metavar="TEXT",
                        help="a prompt's text: before the query, or a chat-template reranker's instruction; '' none")
    rr.set_defaults(handler=_cmd_rerank)

    add = sub.add_parser("add-adapter",
                         help=f"add a PEFT {switchable} adapter to a switchable export (graph untouched)",
                         description=f"Convert a PEFT {switchable} adapter for an existing switchable export, validate "
                                     "it against eager PEFT and the merged model on the export's base, and add its "
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
    bench = sub.add_parser("bench", help="benchmark export folders (and optionally eager PyTorch) on real text",
                           description="Latency (batch 1), throughput (batch 32/128), cold start, peak RSS, tokens/s "
                                       "and quality vs the first contender; writes Markdown, JSON and a PNG plot.")
    bench.add_argument("paths", nargs="+", help="export folders to compare")
    bench.add_argument("--eager", metavar="BASE", help="also time eager sentence-transformers on BASE (needs torch)")
    bench.add_argument("--adapter", help="PEFT adapter for the eager contenders")
    bench.add_argument("--eager-merged", action="store_true", help="add eager with the adapter merged by PEFT")
    bench.add_argument("--queries", type=int, default=300, help="single queries for batch-1 latency (300)")
    bench.add_argument("--sentences", type=int, default=1000, help="sentences for throughput (1000)")
    bench.add_argument("--texts", help="text file, one sentence per line (default: the demo corpus)")
    bench.add_argument("--gate-data", help="query/passage JSON lines for NDCG@10 (default: demo held-out pairs)")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--out", default="bench-results", help="output folder (bench-results)")
    bench.add_argument("--quick", action="store_true", help="smoke run: 50 queries, 200 sentences, batch 32 only")
    bench.set_defaults(handler=_cmd_bench)

    _add_serve_parser(sub)
    from .cli_embed import add_embed_parser  # light: argparse only

    add_embed_parser(sub)

    from .ray.cli import add_serve_ray_parser  # light: Ray is imported when the command runs

    add_serve_ray_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status: 0, 2 for any error (one line on stderr), 1 when stdout was
    closed before the output was written (`| head`), 130 on Ctrl+C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a reader that went away shows here, inside the try, not at interpreter exit
        return code
    except PeftExportError as err:
        print(f"peft-export: error: {err.for_cli()}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_OUTPUT_CLOSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _discard_stdout() -> None:
    """The reader of stdout went away: point stdout at /dev/null so that Python's final flush at exit does not
    raise again (the recipe of Python's docs, "Note on SIGPIPE")."""
    try:
        fileno = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's StringIO): nothing to flush later
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fileno)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
