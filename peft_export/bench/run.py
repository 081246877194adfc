"""`peft-export bench`: assemble contenders and workloads from command-line arguments, run, write reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..demo import EVAL_SIZE as GATE_PAIRS
from ..errors import ConfigError
from .suite import COLUMNS, Workload, eager_contender, linear_flops_per_token, plot, run_suite, runtime_contender

QUICK_PAIRS = 100


def load_workload(args: argparse.Namespace) -> Workload:
    from ..demo import load_pairs, load_sentences
    from ..export.gate_data import load_pairs_file

    if args.texts:
        with open(args.texts, encoding="utf-8") as fh:
            sentences = [line.strip() for line in fh if line.strip()]
        if not sentences:
            raise ConfigError(f"{args.texts} holds no sentences")
        sentences = sentences[: args.sentences]
    else:
        sentences = load_sentences(args.sentences)
    pairs = load_pairs_file(args.gate_data)
    queries = [p["query"] for p in load_pairs("eval")][: args.queries]
    if args.quick:
        return Workload(queries[:50], sentences[:200], pairs[:QUICK_PAIRS], batch_sizes=(32,), repeats=1,
                        cold_start=False)
    return Workload(queries, sentences, pairs)


def run_bench_command(args: argparse.Namespace) -> int:
    workload = load_workload(args)
    contenders = []
    if args.eager:
        contenders.append(eager_contender(args.eager, args.adapter, device=args.device))
        if args.eager_merged and args.adapter:
            contenders.append(eager_contender(args.eager, args.adapter, merged=True, device=args.device))
    for path in args.paths:
        contenders.append(runtime_contender(path, device=args.device))
    first_runtime = next(c for c in contenders if "path" in c.notes)
    from ..runtime.model import EmbeddingModel

    probe = EmbeddingModel(first_runtime.notes["path"])
    flops = linear_flops_per_token(Path(first_runtime.notes["path"]) / probe.config.model_file)
    report = run_suite(contenders, workload, lambda texts: sum(probe._tokenizer.count_tokens(texts)), flops,
                       title="peft-export bench")
    columns = COLUMNS
    if args.quick:
        columns = quick_columns(len(workload.pairs))
        report.notes.append(
            f"--quick: quality on {len(workload.pairs)} pairs is indicative only (one query ranked differently "
            f"moves NDCG@10 by about 1/{len(workload.pairs)}); it is not the export's quality gate, which uses the "
            f"{GATE_PAIRS} held-out demo pairs by default. Run without --quick for figures comparable with the gate.")
    out = Path(args.out)
    md = report.write(out, "bench", columns)
    png = plot(report, out / "bench.png")
    print(md.read_text())
    print(f"wrote {md}, {out / 'bench.json'}" + (f", {png}" if png else ""))
    if png is None:
        print("peft-export: bench.png not written: matplotlib is not installed. Install the plot extra with: "
              "pip install 'peft_export[bench]'", file=sys.stderr)
    return 0


def quick_columns(pairs: int) -> list[tuple[str, str, str]]:
    """The table's columns with the quality figure labelled for what a smoke run's few pairs can say."""
    return [(key, f"NDCG@10 ret. (indicative, {pairs} pairs)" if key == "ndcg10_retention" else header, spec)
            for key, header, spec in COLUMNS]
