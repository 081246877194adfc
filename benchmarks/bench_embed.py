"""`peft-export embed` on a real-text corpus vs a user's loop around in-process `encode`, one process each.

Measures, on this machine, in one run (each stage recorded in WORK/results.json as it ends, so a killed run picks up
after its last finished stage):

1. processes x threads for `embed`: 1 x 2 vs 2 x 1 (alternating, twice each), which decides the default;
2. end-to-end texts/s and peak RSS (the process tree, sampled every 0.1 s, plus the kernel's peak for the main
   process) of `encode` (read the JSONL, `EmbeddingModel.encode` of all texts, `np.save`) and of `peft-export
   embed` (JSONL -> Parquet with ids), at 10k and at 100k texts;
3. a kill -9 of `embed` at about half-way, then the same command again: time lost and rows redone, and that the
   resumed output equals the uninterrupted one bit for bit;
4. that what was timed is right: `embed`'s vectors vs `encode`'s (max abs diff) and ids in input order.

The corpus is real text from the demo corpus (Python standard-library docstrings and Language Reference
paragraphs, peft_export/demo/corpus.jsonl): every query, and every run of 1 or 2 consecutive sentences of every
passage (~10k distinct texts). 100k texts cycle through that pool; each cycle varies the text so no two texts are the
same string (cycle 0: as is; then prefixed with the documented object's name, followed by the pair's query,
prefixed with "Note:", ...), see `variants`.

    python benchmarks/bench_embed.py --export all-MiniLM-L6-v2-demo-onnx   # `peft-export merge-onnx` makes it
    python benchmarks/bench_embed.py --export DIR --texts 5000 --small 1000 --parallel-texts 500   # smoke run

On a machine too busy for 100k texts through MiniLM, the pipeline's own memory and overhead at 100k can be measured
with the tests' tiny BERT (peft_export.bench.tiny_models: hidden 32, 2 layers; needs torch to build once):

    python benchmarks/bench_embed.py --build-tiny-export /tmp/tiny-onnx
    python benchmarks/bench_embed.py --export /tmp/tiny-onnx --parallel 2x1 --work /tmp/bench-embed-tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

from peft_export.bench.builders import tiny_bert_export
from peft_export.bench.child import REPO_ROOT, must_succeed, run_child
from peft_export.bench.machine import uptime
from peft_export.bench.machine import cpu_model
from peft_export.bench.texts import distinct_pool, write_jsonl_corpus

# ----- children -----
def child_encode(export: str, source: str, output: str) -> None:
    """A user's loop: read every text, encode them all in this process, save the array."""
    start = time.perf_counter()
    from peft_export import EmbeddingModel

    with open(source, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    model = EmbeddingModel(export)
    loaded = time.perf_counter()
    vectors = model.encode(texts, batch_size=32)
    encoded = time.perf_counter()
    np.save(output, vectors)
    print(json.dumps({"load_s": loaded - start, "encode_s": encoded - loaded, "rows": len(texts)}))


def steady_rate(result: dict, rows: int) -> float:
    """texts/s once the model is loaded, from embed's summary line (or encode's own timing)."""
    if result["stdout"].strip():
        return rows / json.loads(result["stdout"].strip().splitlines()[-1])["encode_s"]
    found = re.search(r"in ([0-9.]+) s \(.*; ([0-9.]+) s of it checking", result["stderr"])
    return rows / (float(found.group(1)) - float(found.group(2))) if found else float("nan")


PART_ROWS: list[str] = []  # ["--part-rows", N] when given


def embed_command(export: str, source: Path, output: Path, processes: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "peft_export.cli", "embed", export, str(source), "-o", str(output), "--id-column",
            "id", "--processes", str(processes), "--threads", str(threads), "--quiet", *PART_ROWS]


def encode_command(export: str, source: Path, output: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child-encode", export, str(source), str(output)]


def read_parquet_vectors(path: Path) -> tuple[list, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table.column("id").to_pylist(), np.asarray(flat, np.float32).reshape(table.num_rows, -1)


# ----- stages -----
class Stages:
    """Results by stage name in a JSON file, written after each stage (a killed benchmark resumes after it)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, name: str, fn) -> dict:
        if name not in self.data:
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            self.data[name] = fn()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)
            shown = {k: v for k, v in self.data[name].items() if k not in ("stdout", "stderr")}
            print(f"    {shown}", flush=True)
        return self.data[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", help="export folder (required; the demo: `peft-export merge-onnx`)")
    parser.add_argument("--texts", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000, help="the smaller run for the RSS comparison")
    parser.add_argument("--parallel-texts", type=int, default=5_000, help="texts per processes x threads run")
    parser.add_argument("--parallel", metavar="PxT", help="skip the processes x threads runs and use this (e.g. 1x2)")
    parser.add_argument("--part-rows", type=int, help="embed's --part-rows (default: embed's own, 4096)")
    parser.add_argument("--work", default="/tmp/bench-embed", help="corpus, outputs and results.json")
    parser.add_argument("--out", default=None, help="folder for bench_embed.md (default: benchmarks/results/"
                                                    "<date>-xeon-2core)")
    parser.add_argument("--build-tiny-export", metavar="DIR", help="build the tiny BERT export in DIR, exit")
    parser.add_argument("--child-encode", nargs=3, metavar=("EXPORT", "INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_encode:
        child_encode(*args.child_encode)
        return 0
    if args.build_tiny_export:
        print(tiny_bert_export(Path(args.build_tiny_export)))
        return 0
    if not args.export:
        parser.error("--export is required")
    if args.part_rows:
        PART_ROWS[:] = ["--part-rows", str(args.part_rows)]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(work / "results.json")
    export = str(Path(args.export).absolute())
    n, small = args.texts, args.small
    corpus = {size: work / f"corpus-{size}.jsonl" for size in {n, small, args.parallel_texts}}
    for size, path in corpus.items():
        if not path.is_file():
            write_jsonl_corpus(path, size)

    stages.run("machine", lambda: {
        "uptime": uptime(), "cpu": cpu_model(),
        "cores": os.cpu_count(), "python": platform.python_version(), "export": export,
        "model": json.loads((Path(export) / "peft_export.json").read_text())["base"]["id"],
        "part_rows": args.part_rows or 4096,
        "onnxruntime": __import__("onnxruntime").__version__, "pyarrow": __import__("pyarrow").__version__,
        "distinct_texts": len({json.loads(line)["text"] for line in open(corpus[n], encoding="utf-8")}),
        "pool": len(distinct_pool()),
    })
    # 1. processes x threads, alternating.
    for rep in (1, 2) if not args.parallel else ():
        for processes, threads in ((1, 2), (2, 1)):
            name = f"parallel_{processes}x{threads}_run{rep}"
            stages.run(name, lambda p=processes, t=threads: must_succeed(run_child(embed_command(
                export, corpus[args.parallel_texts], work / "par-out", p, t)
                + ["--force", "--part-rows", str(max(1, args.parallel_texts // 8))]), "embed"))  # parts >= workers
    # Decided on the rate once the model is loaded: a corpus worth a job runs long after startup.
    rate = {} if args.parallel else {
        pt: float(np.median([steady_rate(stages.data[f"parallel_{pt}_run{r}"], args.parallel_texts) for r in (1, 2)]))
        for pt in ("1x2", "2x1")}
    best = args.parallel or max(rate, key=rate.get)
    processes, threads = (int(x) for x in best.split("x"))

    # 2. encode vs embed, small then large.
    for size in (small, n):
        stages.run(f"encode_{size}", lambda s=size: must_succeed(run_child(encode_command(
            export, corpus[s], work / f"encode-{s}.npy")), "encode"))
        stages.run(f"embed_{size}", lambda s=size: must_succeed(run_child(embed_command(
            export, corpus[s], work / f"embed-{s}", processes, threads) + ["--force"]), "embed"))
    # The large run once more, in the other order (embed first); the ratio is the median of the two rounds.
    stages.run(f"embed_{n}_r2", lambda: must_succeed(run_child(embed_command(
        export, corpus[n], work / f"embed-{n}-r2", processes, threads) + ["--force"]), "embed"))
    stages.run(f"encode_{n}_r2", lambda: must_succeed(run_child(encode_command(
        export, corpus[n], work / f"encode-{n}-r2.npy")), "encode"))

    # 3. kill -9 at about half-way, then the same command again.
    killed_output = work / f"embed-{n}-killed"
    state_file = killed_output / "_embed_state.json"

    kill_at = time.perf_counter() + stages.data[f"embed_{n}"]["wall_s"] / 2  # reset when the killed run starts

    def half_done() -> bool:
        return time.perf_counter() >= kill_at

    def killed_run() -> dict:
        import shutil

        nonlocal kill_at
        shutil.rmtree(killed_output, ignore_errors=True)
        kill_at = time.perf_counter() + stages.data[f"embed_{n}"]["wall_s"] / 2
        result = run_child(embed_command(export, corpus[n], killed_output, processes, threads), kill_when=half_done)
        result["rows_in_state_at_kill"] = json.loads(state_file.read_text())["rows_done"]
        return result

    stages.run("kill_at_half", killed_run)
    stages.run("resume", lambda: must_succeed(run_child(embed_command(export, corpus[n], killed_output, processes,
                                                                      threads)), "resume"))

    # 4. what was timed is right.
    def check() -> dict:
        ids, embed_vectors = read_parquet_vectors(work / f"embed-{n}")
        resumed_ids, resumed = read_parquet_vectors(killed_output)
        encoded = np.load(work / f"encode-{n}.npy")
        return {"ids_in_order": ids == [f"doc-{i:07d}" for i in range(n)],
                "resumed_ids_equal": resumed_ids == ids,
                "resumed_bit_identical": bool(np.array_equal(resumed, embed_vectors)),
                "max_abs_diff_embed_vs_encode": float(np.abs(embed_vectors - encoded).max()),
                "rows_bit_identical_to_encode": float((embed_vectors == encoded).all(1).mean())}

    stages.run("check", check)
    stages.run("machine_after", lambda: {"uptime": uptime()})
    results = REPO_ROOT / "benchmarks" / "results"
    out = Path(args.out) if args.out else results / f"{time.strftime('%Y-%m-%d')}-xeon-2core"
    out.mkdir(parents=True, exist_ok=True)
    text = report(stages.data, n, small, args.parallel_texts, rate, best)
    (out / "bench_embed.md").write_text(text, encoding="utf-8")
    print(f"wrote {out / 'bench_embed.md'}")
    return 0


def load(result: dict) -> str:
    return f"{result['load_before'][0]:.1f} -> {result['load_after'][0]:.1f}"


def parallel_section(data: dict, parallel_texts: int, rate: dict, best: str) -> list[str]:
    lines = [
        f"## processes x threads ({parallel_texts:,} texts, JSONL -> Parquet)",
        "",
        "| run | processes x threads | texts/s, model loaded | texts/s, end to end | peak RSS MB (tree) | load |",
        "|---|---|---|---|---|---|",
    ]
    for r in (1, 2):
        for pt in ("1x2", "2x1"):
            a = data[f"parallel_{pt}_run{r}"]
            lines.append(f"| {r} | {pt.replace('x', ' x ')} | {steady_rate(a, parallel_texts):.1f} | "
                         f"{parallel_texts / a['wall_s']:.1f} | {a['peak_rss_mb']:.0f} | {load(a)} |")
    return lines + ["", f"Median, model loaded: 1 x 2 {rate['1x2']:.1f} texts/s, 2 x 1 {rate['2x1']:.1f} texts/s; "
                        f"the runs below use {best.replace('x', ' x ')}.", ""]


def report(data: dict, n: int, small: int, parallel_texts: int, rate: dict, best: str) -> str:
    lines = [
        "# peft-export embed vs in-process encode",
        "",
        f"Model: {data['machine']['model']} (`{data['machine']['export']}`, ONNX Runtime, CPU).",
        f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores; Python {data['machine']['python']}, "
        f"onnxruntime {data['machine']['onnxruntime']}, pyarrow {data['machine']['pyarrow']}.",
        f"`uptime` at the start: `{data['machine']['uptime']}`; at the end: `{data['machine_after']['uptime']}`.",
        "Each contender ran in its own process, one after the other, nothing else running (1-minute load averages "
        "per row).",
        "",
        f"Corpus: {n:,} real texts ({data['machine']['distinct_texts']:,} distinct), from a pool of "
        f"{data['machine']['pool']:,} queries and 1-2 sentence runs of the demo corpus, varied per cycle "
        "(benchmarks/bench_embed.py, `variants`).",
        "",
    ]
    if rate:
        lines += parallel_section(data, parallel_texts, rate, best)
    else:
        lines += [f"processes x threads: {best.replace('x', ' x ')} (given, not measured in this run).", ""]
    lines += [
              "## encode vs embed", "",
              "End to end: start the process, read the JSONL, load the model, embed, write (`.npy` for encode, "
              "Parquet with ids for embed). Model loaded: encode's `encode()` call alone; embed's run after the "
              "input check and model load (reading and writing included).", "",
              "| contender | texts | wall s | texts/s end to end | vs encode | texts/s model loaded | vs encode | "
              "peak RSS MB (tree) | load (1 min) |",
              "|---|---|---|---|---|---|---|---|---|"]
    rounds = [(size, data[f"encode_{size}"], [("encode (one call)", data[f"encode_{size}"]),
                                             ("peft-export embed", data[f"embed_{size}"])]) for size in (small, n)]
    if f"embed_{n}_r2" in data:
        enc2, emb2 = data[f"encode_{n}_r2"], data[f"embed_{n}_r2"]
        rounds.append((n, enc2, [("peft-export embed (round 2, first)", emb2), ("encode (round 2, second)", enc2)]))
    for size, enc, rows in rounds:
        for name, result in rows:
            steady = steady_rate(result, size)
            lines.append(f"| {name} | {size:,} | {result['wall_s']:.1f} | {size / result['wall_s']:.1f} | "
                         f"{enc['wall_s'] / result['wall_s']:.1%} | {steady:.1f} | "
                         f"{steady / steady_rate(enc, size):.1%} | {result['peak_rss_mb']:.0f} | {load(result)} |")
    if f"embed_{n}_r2" in data:
        ends = [data[f"encode_{n}"]["wall_s"] / data[f"embed_{n}"]["wall_s"], enc2["wall_s"] / emb2["wall_s"]]
        lines += ["", f"{n:,} texts, end to end, embed vs encode: round 1 {ends[0]:.1%}, round 2 {ends[1]:.1%}, "
                  f"median {float(np.median(ends)):.1%}."]
    killed, resumed, full = data["kill_at_half"], data["resume"], data[f"embed_{n}"]
    lost = killed["wall_s"] + resumed["wall_s"] - full["wall_s"]
    check = data["check"]
    lines += [
        "",
        "## kill -9 at about half-way",
        "",
        f"Killed at half the uninterrupted run's wall time, after {killed['wall_s']:.1f} s, with "
        f"{killed['rows_in_state_at_kill']:,} rows recorded in the state file; the same command then ran "
        f"{resumed['wall_s']:.1f} s. Killed + resumed = "
        f"{killed['wall_s'] + resumed['wall_s']:.1f} s vs {full['wall_s']:.1f} s uninterrupted: {lost:.1f} s lost "
        f"(a second model load and input check, plus the rows after the last finished part, redone: parts of "
        f"{data['machine'].get('part_rows', 4096):,} rows, up to one per worker in flight; "
        f"and the load moved between runs). Resumed output bit-identical to the uninterrupted one: "
        f"{check['resumed_bit_identical']}; ids equal: {check['resumed_ids_equal']}.",
        "",
        "## correctness of what was timed",
        "",
        f"ids in input order: {check['ids_in_order']}; embed vs encode max abs diff "
        f"{check['max_abs_diff_embed_vs_encode']:.1e} ({check['rows_bit_identical_to_encode']:.1%} of rows "
        "bit-identical: embed encodes each part in slices of at most 512 rows of similar lengths, so some batches "
        "differ from one encode() of everything; each slice is bit-identical to encode() of its rows, "
        "tests/test_embed.py).",
        "",
        "Reproduce: `peft-export merge-onnx -o minilm-demo-onnx && python benchmarks/bench_embed.py --export "
        "minilm-demo-onnx`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
