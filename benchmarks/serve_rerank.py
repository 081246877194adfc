"""Load test of `peft-export serve` on a reranker export: pairs/s over `/v1/rerank` at concurrency 8, each request
1 query x N passages, against in-process `CrossEncoderModel.predict` on the same pairs.

Starts the server in its own process on 127.0.0.1 (peft_export.bench.server), first checks that `/v1/rerank`
gives the scores and order of in-process `rank` for two adapters (a switchable export's first two; the base
model where it has none), then runs warm-up and measured rounds, round-robin over those models, every response
compared with the in-process scores (within 1e-5) before any speed is reported. Rounds alternate the server
and in-process `predict` so that a drift in the machine's load hits both.

    python benchmarks/serve_rerank.py RERANKER_EXPORT                       # 3 rounds of 20 s
    python benchmarks/serve_rerank.py RERANKER_EXPORT --quick               # one short round: a smoke run
    python benchmarks/serve_rerank.py RERANKER_EXPORT --passages 100 --concurrency 8 --out bench-results

The load generator runs on the same machine and takes CPU from the server: on a small machine the HTTP /
in-process ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path


from peft_export.bench import http_load
from peft_export.bench.machine import machine_info, machine_line
from peft_export.bench.report import markdown_table, write_report
from peft_export.bench.server import served
from peft_export.bench.stats import median
from peft_export.bench.texts import demo_queries_and_sentences

TOLERANCE = 1e-5
COLUMNS = [("round", "round", "d"), ("concurrency", "concurrency", "d"), ("requests", "requests", "d"),
           ("pairs_per_s", "pairs/s (HTTP)", ".1f"), ("in_process_pairs_per_s", "pairs/s (in-process)", ".1f"),
           ("ratio", "HTTP / in-process", ".2f"), ("p50_ms", "p50 ms", ".1f"), ("p95_ms", "p95 ms", ".1f"),
           ("p99_ms", "p99 ms", ".1f"), ("errors", "errors", "d"), ("max_abs_diff", "max diff", ".1e")]


def workload(queries: int, passages: int) -> list[tuple[str, list[str]]]:
    """``queries`` real queries, each with its own window of ``passages`` real sentences of mixed length."""
    texts_queries, sentences = demo_queries_and_sentences(queries, queries * passages, cycle=True)
    return [(q, sentences[i * passages:(i + 1) * passages]) for i, q in enumerate(texts_queries)]


def served_models(model, base_name: str) -> list[tuple[str, str | bool]]:
    """(name in `model`, adapter for predict) of the two models the benchmark checks and loads: a switchable
    export's first two adapters, else its base."""
    adapters = model.list_adapters()[:2]
    return [(name, name) for name in adapters] if adapters else [(base_name, False)]


def in_process_rate(model, requests, adapter, batch_size: int) -> float:
    """predict() pairs/s over every request once (one call per request, as the server gets them)."""
    started = time.perf_counter()
    pairs = 0
    for query, documents in requests:
        model.predict([(query, d) for d in documents], batch_size=batch_size, adapter=adapter)
        pairs += len(documents)
    return pairs / (time.perf_counter() - started)


async def check_rank(client, model, models, query: str, documents: list[str]) -> dict[str, float]:
    """`/v1/rerank` vs in-process `rank` per model: the same order, scores within TOLERANCE (else SystemExit)."""
    diffs = {}
    for name, adapter in models:
        response = await client.post("/v1/rerank", json={"model": name, "query": query, "documents": documents,
                                                         "truncate": True})
        if response.status_code != 200:
            raise SystemExit(f"/v1/rerank for {name!r} answered {response.status_code}: {response.text[:300]}")
        got = response.json()["results"]
        want = model.rank(query, documents, adapter=adapter)
        diffs[name] = max(abs(g["relevance_score"] - w["score"]) for g, w in zip(got, want))
        if [g["index"] for g in got] != [w["corpus_id"] for w in want] or diffs[name] > TOLERANCE:
            raise SystemExit(f"/v1/rerank for {name!r} differs from in-process rank (max score diff "
                             f"{diffs[name]:.2e}); nothing is reported")
        print(f"/v1/rerank {name!r} == in-process rank: same order, max score diff {diffs[name]:.1e}", flush=True)
    return diffs


async def measure(args, export: Path, model, models, requests, references) -> tuple[list[dict], dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    names = [name for name, _ in models]
    with served(export, args.serve_arg, out / "serve_rerank_server.log", timeout=300) as server:
        async with http_load.client(server.url, args.concurrency) as client:
            checked = await check_rank(client, model, models, *requests[0])
            pick = lambda n: names[n % len(names)]  # noqa: E731
            await http_load.rerank_level(client, requests, references, pick, args.concurrency,
                                         max_requests=args.concurrency * 2, max_seconds=args.seconds)  # warm-up
            for round_number in range(1, args.rounds + 1):
                row = await http_load.rerank_level(client, requests, references, pick, args.concurrency,
                                                   args.max_requests, args.seconds)
                rates = [in_process_rate(model, requests, adapter, args.batch_size) for _, adapter in models]
                row.update(round=round_number, in_process_pairs_per_s=median(rates))
                row["ratio"] = row["pairs_per_s"] / row["in_process_pairs_per_s"]
                rows.append(row)
                print(f"round {round_number}: {row['pairs_per_s']:.1f} pairs/s over HTTP, "
                      f"{row['in_process_pairs_per_s']:.1f} in process; p50 {row['p50_ms']:.1f} ms, "
                      f"p99 {row['p99_ms']:.1f} ms; errors {row['errors']}", flush=True)
    return rows, {"models": names, "rank_check_max_diff": checked, "exit_status_after_sigterm": server.exit_status}


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = ["## peft-export serve: /v1/rerank pairs/s", "", machine_line(report["machine"]), "",
             f"Export: `{report['export']}`; models loaded round-robin: {', '.join(report['server']['models'])}; "
             f"{report['queries']} queries x {report['passages']} passages per request (demo corpus).", "",
             *markdown_table(report["rows"], COLUMNS), "",
             f"- Median over rounds: **{s['pairs_per_s']:.1f} pairs/s** over HTTP at concurrency "
             f"{report['concurrency']} (in process: {s['in_process_pairs_per_s']:.1f}; ratio {s['ratio']:.2f}); "
             f"p50 {s['p50_ms']:.1f} ms.",
             "- `/v1/rerank` vs in-process `rank` before the load: "
             + ", ".join(f"{k} {v:.1e}" for k, v in report["server"]["rank_check_max_diff"].items())
             + f"; every response during the load within {s['max_abs_diff']:.1e} (limit {TOLERANCE:g}).",
             f"- Server exit status after SIGTERM: {report['server']['exit_status_after_sigterm']}.",
             f"- Command: `{report['command']}`", "- The load generator shares the machine's cores with the server."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="reranker export folder to serve (switchable: its first two adapters)")
    parser.add_argument("--passages", type=int, default=100, help="passages per request (default 100)")
    parser.add_argument("--queries", type=int, default=8, help="distinct queries the requests cycle through")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (each: HTTP, then in process)")
    parser.add_argument("--seconds", type=float, default=20.0, help="longest duration of one HTTP round")
    parser.add_argument("--max-requests", type=int, default=2000, help="most requests in one HTTP round")
    parser.add_argument("--batch-size", type=int, default=32, help="in-process predict() batch size")
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke run, no figures)")
    parser.add_argument("--out", default="bench-results", help="folder for serve_rerank.md/.json")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `peft-export serve` argument")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.max_requests, args.queries = 1, 2.0, 16, 2
        args.passages = min(args.passages, 10)
    export = Path(args.export)

    from peft_export import CrossEncoderModel

    model = CrossEncoderModel(export)
    models = served_models(model, export.resolve().name)
    requests = workload(args.queries, args.passages)
    references = {(name, i): model.predict([(q, d) for d in documents], adapter=adapter)
                  for name, adapter in models for i, (q, documents) in enumerate(requests)}
    rows, server = asyncio.run(measure(args, export, model, models, requests, references))
    worst = max(row["max_abs_diff"] for row in rows)
    summary = {key: median([row[key] for row in rows])
               for key in ("pairs_per_s", "in_process_pairs_per_s", "ratio", "p50_ms")}
    report = {"title": "peft-export serve rerank load benchmark", "machine": machine_info(), "export": str(export),
              "queries": args.queries, "passages": args.passages, "concurrency": args.concurrency, "rows": rows,
              "server": server, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "summary": {**summary, "max_abs_diff": worst}}
    write_report(Path(args.out), "serve_rerank", report, markdown(report))
    print(markdown(report))
    errors = sum(row["errors"] for row in rows)
    if worst > TOLERANCE or errors:
        print(f"FAILED: max score diff {worst:.2e} (limit {TOLERANCE:g}); {errors} failed requests", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
