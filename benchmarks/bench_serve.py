"""Load test of `peft-export serve` against in-process EmbeddingModel.encode, in one run on one machine.

Starts the server as a separate process on 127.0.0.1, measures in-process ``encode`` throughput on the same
sentences, then sweeps concurrency (1, 2, 4, ..., 64) with an async HTTP client sending single-sentence and
32-sentence OpenAI-style requests (round-robin over every served model: the base and its adapters). Reports
requests/s, embeddings/s, p50/p95/p99 latency and the HTTP / in-process throughput ratio, and checks every
response against the in-process embeddings before reporting any speed (within 1e-5; int8 / fp16 exports, whose
results move with batch composition, to a cosine of at least 0.99).

    python benchmarks/bench_serve.py EXPORT_FOLDER                 # full sweep, a few minutes
    python benchmarks/bench_serve.py EXPORT_FOLDER --quick         # smoke run, about a minute
    python benchmarks/bench_serve.py EXPORT_FOLDER --out bench-results --serve-arg=--max-batch-tokens=4096

Traffic only ever goes to 127.0.0.1; every level is bounded in requests and seconds. Note that the load
generator runs on the same machine and takes CPU from the server: on a small machine the ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

from peft_export.bench import http_load
from peft_export.bench.http_load import LOSSY_MIN_COSINE, is_lossy
from peft_export.bench.machine import machine_info, machine_line
from peft_export.bench.report import markdown_table, write_report
from peft_export.bench.server import served
from peft_export.bench.texts import sentences_with_source

SHAPES = {"single": 1, "batch32": 32}
COLUMNS = [("shape", "request", ""), ("concurrency", "concurrency", "d"), ("requests", "requests", "d"),
           ("requests_per_s", "requests/s", ".1f"), ("embeddings_per_s", "embeddings/s", ".1f"),
           ("ratio", "HTTP / in-process", ".2f"), ("p50_ms", "p50 ms", ".1f"), ("p95_ms", "p95 ms", ".1f"),
           ("p99_ms", "p99 ms", ".1f"), ("errors", "errors", "d"), ("max_abs_diff", "max diff", ".1e"),
           ("min_cosine", "min cos", ".5f")]


# ----- in-process reference -----
def in_process_rate(model, sentences: list[str], repeats: int) -> tuple[float, np.ndarray]:
    """encode() sentences/s (median of ``repeats`` passes, batch_size 32) and the embeddings of the last pass."""
    model.encode(sentences[:64], batch_size=32)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        embeddings = model.encode(sentences, batch_size=32)
        rates.append(len(sentences) / (time.perf_counter() - start))
    return float(np.median(rates)), embeddings


def references_per_model(model, sentences: list[str], base: np.ndarray) -> dict:
    """What every served model should return for each sentence: keyed by adapter (None: the base)."""
    references = {None: base}
    for adapter in getattr(model, "list_adapters", list)():
        references[adapter] = model.encode(sentences, batch_size=32, adapter=adapter)
    return references


# ----- load generator -----
async def run_level(client, models: list[str], by_name: dict, sentences: list[str], shape: str, concurrency: int,
                    max_requests: int, max_seconds: float) -> dict:
    """Round-robin over every served model."""
    row = await http_load.load_level(client, sentences, by_name, SHAPES[shape], lambda n: models[n % len(models)],
                                     concurrency, max_requests, max_seconds)
    return {"shape": shape, **row}


async def sweep(args, export: Path, sentences: list[str], references, reference_rate: float) -> tuple[list, dict]:
    out = Path(args.out)
    rows = []
    with served(export, args.serve_arg, out / "bench_serve_server.log", timeout=120) as server:
        async with http_load.client(server.url, max(args.concurrency)) as client:
            models = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
            by_name = {name: references[None if i == 0 else name] for i, name in enumerate(models)}
            for shape in SHAPES:
                for concurrency in args.concurrency:
                    await run_level(client, models, by_name, sentences, shape, concurrency,
                                    max_requests=concurrency * 2, max_seconds=5)  # warm-up, not reported
                    row = await run_level(client, models, by_name, sentences, shape, concurrency,
                                          args.max_requests, args.seconds)
                    row["ratio"] = row["embeddings_per_s"] / reference_rate  # final ratio: see main()
                    rows.append(row)
                    print(f"{shape:8s} c={concurrency:3d}: {row['requests_per_s']:8.1f} req/s "
                          f"{row['embeddings_per_s']:8.1f} emb/s  ratio {row['ratio']:.2f}  "
                          f"p50 {row['p50_ms']:.1f} p99 {row['p99_ms']:.1f} ms  errors {row['errors']}", flush=True)
            server_info = {"models": models, "metrics_sample": _batch_summary((await client.get("/metrics")).text)}
    server_info["exit_status_after_sigterm"] = server.exit_status
    return rows, server_info


def _batch_summary(metrics: str) -> dict:
    """Mean inputs per model call, from the server's Prometheus histogram."""
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith("peft_export_batch_size_sum"):
            total += float(line.split()[-1])
        elif line.startswith("peft_export_batch_size_count"):
            count += float(line.split()[-1])
    return {"model_calls": count, "mean_inputs_per_call": total / count if count else 0.0}


def markdown(report: dict) -> str:
    lines = ["## peft-export serve: HTTP load vs in-process encode", "", machine_line(report["machine"]), "",
             f"Model: `{report['export']}` (served: {', '.join(report['server']['models'])}); sentences: "
             f"{report['sentences_source']} ({report['in_process']['sentences']}).", "",
             f"In-process `EmbeddingModel.encode(batch_size=32)`: **{report['in_process']['sentences_per_s']:.1f} "
             f"sentences/s** (median of passes; {report['in_process']['before_sweep']:.1f} before the sweep, "
             f"{report['in_process']['after_sweep']:.1f} after; the ratio uses the faster).", "",
             *markdown_table(report["rows"], COLUMNS)]
    s = report["summary"]
    lines += ["", f"- Saturation (best embeddings/s over HTTP): {s['best_embeddings_per_s']:.1f} with "
                  f"{s['best_shape']} requests at concurrency {s['best_concurrency']}: **ratio {s['ratio']:.2f}** "
                  "of in-process (target >= 0.80).",
              f"- p99 at concurrency 16: single {s['p99_c16_single_ms'] or 'n/a'} ms, "
              f"batch32 {s['p99_c16_batch32_ms'] or 'n/a'} ms.",
              f"- Every response checked against in-process `encode`: {s['check']}.",
              f"- Server: {report['server']['metrics_sample']['mean_inputs_per_call']:.1f} inputs per model call on "
              f"average; exit status after SIGTERM: {report['server']['exit_status_after_sigterm']}.",
              f"- Command: `{report['command']}`", "- The load generator shares the machine's cores with the server."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="export folder to serve")
    parser.add_argument("--quick", action="store_true", help="concurrency 1, 4, 16, 64 with short levels")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--seconds", type=float, default=10.0, help="longest duration of one level")
    parser.add_argument("--max-requests", type=int, default=3000, help="most requests in one level")
    parser.add_argument("--sentences", type=int, default=2048, help="sentence pool (and in-process pass) size")
    parser.add_argument("--out", default="bench-results", help="folder for bench_serve.md/.json")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `peft-export serve` argument")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.seconds, args.max_requests, args.sentences = [1, 4, 16, 64], 3.0, 400, 1024
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export = Path(args.export)

    from peft_export import EmbeddingModel

    sentences, source = sentences_with_source(args.sentences)
    model = EmbeddingModel(export)
    repeats = 2 if args.quick else 3
    before, base = in_process_rate(model, sentences, repeats)
    references = references_per_model(model, sentences, base)
    print(f"in-process encode: {before:.1f} sentences/s", flush=True)
    rows, server = asyncio.run(sweep(args, export, sentences, references, before))
    # Measured again after the sweep; the ratio uses the faster of the two (the conservative choice on a
    # machine whose load drifts).
    after, _ = in_process_rate(model, sentences, repeats)
    print(f"in-process encode after the sweep: {after:.1f} sentences/s", flush=True)
    stats = {"sentences_per_s": max(before, after), "before_sweep": before, "after_sweep": after,
             "sentences": len(sentences), "batch_size": 32}
    for row in rows:
        row["ratio"] = row["embeddings_per_s"] / stats["sentences_per_s"]

    worst_diff = max(row["max_abs_diff"] for row in rows)
    worst_cosine = min(row["min_cosine"] for row in rows)
    lossy = is_lossy(model)
    check = (f"min cosine {worst_cosine:.5f}, limit {LOSSY_MIN_COSINE} (lossy export; max abs diff {worst_diff:.1e})"
             if lossy else f"max abs diff {worst_diff:.1e}, limit 1e-5")
    wrong = worst_cosine < LOSSY_MIN_COSINE if lossy else worst_diff > 1e-5
    best = max(rows, key=lambda r: r["embeddings_per_s"])
    p99 = {row["shape"]: round(row["p99_ms"], 1) for row in rows if row["concurrency"] == 16}
    report = {
        "title": "peft-export serve load benchmark", "machine": machine_info(), "export": str(export),
        "sentences_source": source, "in_process": stats, "rows": rows, "server": server,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "summary": {"best_embeddings_per_s": best["embeddings_per_s"], "best_shape": best["shape"],
                    "best_concurrency": best["concurrency"], "ratio": best["ratio"],
                    "p99_c16_single_ms": p99.get("single"), "p99_c16_batch32_ms": p99.get("batch32"),
                    "max_abs_diff": worst_diff, "min_cosine": worst_cosine, "check": check},
    }
    write_report(out, "bench_serve", report, markdown(report))
    print(markdown(report))
    errors = sum(row["errors"] for row in rows)
    if wrong or errors:
        print(f"FAILED: {check}; {errors} failed requests", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
