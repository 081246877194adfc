"""Switchable export (one base graph + LoRA adapter files) vs merged exports, on all-MiniLM-L6-v2.

Measures, in one run on one machine, for adapters of rank 8, 16 and 32 on different target sets:

* the cost of the LoRA branches: batch-1 latency (p50 over short real queries) and batch-32 throughput of the
  switchable graph with the adapter active vs the merged export of the same adapter, as wall-clock time and as
  CPU time per call (CPU time is steadier on a shared machine);
* the same for adapters merged into their own session at run time (``EmbeddingModel.merge_adapter``);
* the cost of switching adapters between calls: round-robin calls over the adapters vs staying on one;
* memory: resident memory of one process holding the base + 20 adapters vs one holding 20 merged models
  (each in a fresh subprocess), and on disk the size of each adapter file vs a merged model.

Every contender's embeddings are checked against the merged export (1e-5) before anything is timed.

    python benchmarks/bench_switchable.py            # ~5 minutes: exports 1 switchable + 3 merged models first
    python benchmarks/bench_switchable.py --quick    # smoke run
    python benchmarks/bench_switchable.py --workdir DIR   # reuse adapters and exports made by an earlier run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from peft_export.bench.builders import onnx_export, switchable_export
from peft_export.bench.child import must_succeed, run_child
from peft_export.bench.machine import machine_info, machine_line
from peft_export.bench.report import write_report
from peft_export.bench.suite import linear_flops_per_token
from peft_export.bench.switchable import ADAPTERS, compare, make_adapters
from peft_export.bench.texts import demo_queries_and_sentences

N_MEMORY_ADAPTERS = 20


def build(workdir: Path, log) -> dict[str, Path]:
    """Adapters (non-zero LoRA on all-MiniLM-L6-v2), one switchable export with all of them, one merged each."""
    paths = make_adapters(workdir) | {"switchable": workdir / "switchable"}
    base = str(paths["base"])
    for name in ADAPTERS:
        folder = paths[f"adapter-{name}"]
        paths[f"merged-{name}"] = workdir / f"merged-{name}"
        if not paths[f"merged-{name}"].exists():
            log(f"exporting merged {name} ...")
            onnx_export(str(folder), paths[f"merged-{name}"], base=base)
    if not paths["switchable"].exists():
        log("exporting switchable ...")
        switchable_export(base, {n: paths[f"adapter-{n}"] for n in ADAPTERS}, paths["switchable"])
    return paths


def lora_flops_per_token(model, name: str) -> float:
    """The branches' arithmetic per token: x @ A then @ B is one multiply-add per element of A and of B. Against the
    base's linear layers it is the least extra time the branches can cost where arithmetic bounds speed (batch 32)."""
    return 2.0 * sum(int(t.size) for t in model.get_adapter_state_dict(name).values())


def timed(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


def switch_cost(model, queries: list[str], rounds: int) -> dict:
    """Per adapter: batch-1 p50 when every call uses another adapter than the previous one (a, b, c, a, b, c, ...)
    vs calls that stay on one adapter for the whole query list (a, a, ..., a, b, b, ..., b, ...). Both make the
    same calls; which one runs first alternates by round, so load drift hits them alike. Long stays matter for
    merge_adapter, whose adapters have weights of their own: a stay keeps them in the CPU caches."""
    names = model.list_adapters()
    times = {mode: {n: [] for n in names} for mode in ("stay", "switch")}
    for r in range(rounds):
        for mode in (("stay", "switch") if r % 2 == 0 else ("switch", "stay")):
            if mode == "stay":
                calls = [(n, q) for n in names for q in queries]
            else:
                calls = [(n, q) for q in queries for n in names]
            for n, q in calls:
                times[mode][n].append(timed(lambda: model.encode([q], adapter=n), time.perf_counter))
    out = {}
    for n in names:
        s, w = float(np.median(times["stay"][n]) * 1000), float(np.median(times["switch"][n]) * 1000)
        out[n] = {"stay_p50_ms": s, "switch_p50_ms": w, "switch_cost_pct": 100 * (w / s - 1)}
    return out


def batch_rotation(model, sentences: list[str], rounds: int) -> dict:
    """Throughput at batch 32 when consecutive batches go to different adapters (a, b, c, a, ...) vs long runs
    on one adapter (a, a, ..., b, b, ..., c, c, ...): the same batches, a server's per-adapter batching."""
    names = model.list_adapters()
    chunks = [sentences[i:i + 32] for i in range(0, len(sentences), 32)]
    rates = {"stay": [], "rotate": []}
    for r in range(rounds):
        for mode in (("stay", "rotate") if r % 2 == 0 else ("rotate", "stay")):
            start = time.perf_counter()
            for j, chunk in enumerate(chunks):
                name = names[j % len(names)] if mode == "rotate" else names[j * len(names) // len(chunks)]
                model.encode(chunk, adapter=name, batch_size=32)
            rates[mode].append(len(sentences) / (time.perf_counter() - start))
    stay, rotate = float(np.median(rates["stay"])), float(np.median(rates["rotate"]))
    return {"stay_per_s": stay, "rotate_per_s": rotate, "rotation_cost_pct": 100 * (1 - rotate / stay)}


# Resident memory after loading (what the process holds); its peak comes from peft_export.bench.child.run_child.
_MEMORY_SCRIPT = """
import json, sys
from peft_export.bench.child import resident_mb as rss_mb
from peft_export import EmbeddingModel
mode, folder, n, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
before = rss_mb()
texts = ['a short query', 'a somewhat longer sentence to embed with the model ' * 3]
if mode in ('switchable', 'merge_adapter'):
    model = EmbeddingModel(folder)
    for i, f in enumerate(files[:n]):
        model.load_adapter(f, adapter_name=f'a{i}')
    if mode == 'merge_adapter':
        model.merge_adapter(model.list_adapters())
    for name in model.list_adapters():
        model.encode(texts, adapter=name)
else:
    models = [EmbeddingModel(folder) for _ in range(n)]
    for m in models:
        m.encode(texts)
print(json.dumps({'rss_mb': rss_mb(), 'rss_before_mb': before}))
"""


def memory(paths: dict[str, Path], workdir: Path, n: int) -> dict:
    """RSS of a fresh process holding the base + n adapters, vs n merged sessions (of one merged export; each
    session holds its own copy of the weights, as n different merged models would)."""
    from peft_export.runtime.lora_layout import Slot
    from peft_export.runtime.onnxruntime_adapters import read_adapter_arrays, write_adapter_file

    config = json.loads((paths["switchable"] / "embedding_config.json").read_text())
    slots = {s["module"]: Slot.from_dict(s) for s in config["lora_slots"]}
    manifest = json.loads((paths["switchable"] / "peft_export.json").read_text())  # the manifest lists the adapters
    sources = [paths["switchable"] / e["file"] for e in manifest["adapters"]]
    files = []
    rng = np.random.default_rng(0)
    for i in range(n):  # n distinct adapters with the three layouts and ranks, random non-zero weights
        arrays = read_adapter_arrays(sources[i % len(sources)])
        out = workdir / "memory-adapters" / f"a{i}.onnx_adapter"
        write_adapter_file(out, {k: (v + rng.normal(0, 1e-3, v.shape)).astype(np.float32) for k, v in arrays.items()})
        files.append(str(out))
    assert all(k.rsplit(".", 1)[0] in slots for k in read_adapter_arrays(Path(files[0])))
    result = {}
    for mode, folder in (("switchable", paths["switchable"]), ("merge_adapter", paths["switchable"]),
                         ("merged", paths[f"merged-{next(iter(ADAPTERS))}"])):
        done = must_succeed(run_child([sys.executable, "-c", _MEMORY_SCRIPT, mode, str(folder), str(n),
                                       json.dumps(files)]), f"memory of {mode}")
        result[mode] = {**json.loads(done["stdout"].strip().splitlines()[-1]), "peak_mb": done["peak_rss_mb"]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="folder for adapters and exports (default: a new temporary folder)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--sentences", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all)")
    parser.add_argument("--spinning-off", action="store_true",
                        help="SessionSettings.throughput() for every session (threads sleep between operators) "
                             "instead of the default settings (threads spin during runs)")
    parser.add_argument("--out", default="bench-results", help="folder for the Markdown and JSON reports")
    parser.add_argument("--quick", action="store_true", help="60 queries, 96 sentences, 1 round, 5 adapters")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the memory measurement")
    args = parser.parse_args(argv)
    n_memory = N_MEMORY_ADAPTERS
    if args.quick:
        args.queries, args.sentences, args.rounds, n_memory = 60, 96, 1, 5
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-switchable-"))
    workdir.mkdir(parents=True, exist_ok=True)

    from peft_export import EmbeddingModel, SessionSettings

    started = time.perf_counter()
    paths = build(workdir, log=print)
    queries, sentences = demo_queries_and_sentences(args.queries, args.sentences, cycle=True)
    preset = SessionSettings.throughput if args.spinning_off else SessionSettings
    switchable = EmbeddingModel(paths["switchable"], session_settings=preset(intra_op_threads=args.threads))
    merged_at_run_time = EmbeddingModel(paths["switchable"], session_settings=preset(intra_op_threads=args.threads))
    merged_at_run_time.merge_adapter(list(ADAPTERS))
    rows = []
    base_flops = linear_flops_per_token(paths[f"merged-{next(iter(ADAPTERS))}"] / "model.onnx")
    for name, (kwargs, targets) in ADAPTERS.items():
        merged = EmbeddingModel(paths[f"merged-{name}"], session_settings=preset(intra_op_threads=args.threads))
        reference = merged.encode(sentences)
        diff = float(np.abs(switchable.encode(sentences, adapter=name) - reference).max())
        merge_diff = float(np.abs(merged_at_run_time.encode(sentences, adapter=name) - reference).max())
        if max(diff, merge_diff) > 1e-5:
            print(f"FAIL: switchable adapter {name} differs from its merged export by {diff:.2g} "
                  f"(merged at run time: {merge_diff:.2g})", file=sys.stderr)
            return 1
        runs = {"merged": lambda t, b, m=merged: m.encode(t, batch_size=b),
                "switchable": lambda t, b, n=name: switchable.encode(t, batch_size=b, adapter=n),
                "merge_adapter": lambda t, b, n=name: merged_at_run_time.encode(t, batch_size=b, adapter=n)}
        res = compare(runs, queries, sentences, args.rounds)
        m, s, g = res["merged"], res["switchable"], res["merge_adapter"]
        rows.append({
            "adapter": name, "r": kwargs["r"], "targets": targets, "max_abs_diff": diff,
            "lora_flops_pct": 100 * lora_flops_per_token(switchable, name) / base_flops,
            "merged_b1_p50_ms": m["b1_wall"]["p50_ms"], "switchable_b1_p50_ms": s["b1_wall"]["p50_ms"],
            "b1_overhead_pct": 100 * (s["b1_wall"]["p50_ms"] / m["b1_wall"]["p50_ms"] - 1),
            "b1_cpu_overhead_pct": 100 * (s["b1_cpu_ms"] / m["b1_cpu_ms"] - 1),
            "merged_b32_per_s": m["b32_per_s"], "switchable_b32_per_s": s["b32_per_s"],
            "b32_overhead_pct": 100 * (1 - s["b32_per_s"] / m["b32_per_s"]),
            "b32_cpu_overhead_pct": 100 * (1 - s["b32_per_cpu_s"] / m["b32_per_cpu_s"]),
            "merge_max_abs_diff": merge_diff, "merge_b1_p50_ms": g["b1_wall"]["p50_ms"],
            "merge_b1_overhead_pct": 100 * (g["b1_wall"]["p50_ms"] / m["b1_wall"]["p50_ms"] - 1),
            "merge_b32_per_s": g["b32_per_s"], "merge_b32_overhead_pct": 100 * (1 - g["b32_per_s"] / m["b32_per_s"]),
            "detail": res,
        })
        r = rows[-1]
        print(f"{name}: switchable b1 {r['b1_overhead_pct']:+.1f}%  b32 {r['b32_overhead_pct']:+.1f}% lower; "
              f"merge_adapter b1 {r['merge_b1_overhead_pct']:+.1f}%  b32 {r['merge_b32_overhead_pct']:+.1f}% lower")
    switching = switch_cost(switchable, queries[:max(20, args.queries // 4)], args.rounds)
    switching_merged = switch_cost(merged_at_run_time, queries[:max(20, args.queries // 4)], args.rounds)
    rotation = {"switchable": batch_rotation(switchable, sentences, args.rounds),
                "merge_adapter": batch_rotation(merged_at_run_time, sentences, args.rounds)}
    mem = {} if args.skip_memory else memory(paths, workdir, n_memory)
    merged_size = (paths[f"merged-{next(iter(ADAPTERS))}"] / "model.onnx").stat().st_size
    disk = {name: (paths["switchable"] / "adapters" / f"{name}.onnx_adapter").stat().st_size for name in ADAPTERS}
    report = {"title": "Switchable export vs merged exports (all-MiniLM-L6-v2)", "machine": machine_info(),
              "settings": vars(args) | {"memory_adapters": n_memory, "workdir": str(workdir)}, "rows": rows,
              "switch_cost": switching, "switch_cost_merge_adapter": switching_merged,
              "batch_rotation": rotation, "memory": mem,
              "disk": {"merged_model_bytes": merged_size, "adapter_file_bytes": disk},
              "wall_s": time.perf_counter() - started}
    print(write_report(Path(args.out), "bench_switchable", report, markdown(report)).read_text())
    return 0


def markdown(report: dict) -> str:
    lines = [f"## {report['title']}", "", machine_line(report["machine"]), "",
             "| adapter | r | targets | LoRA FLOPs | merged b1 p50 ms | switchable b1 p50 ms | b1 overhead "
             "| (CPU time) | merged b32 /s | switchable b32 /s | b32 overhead | (CPU time) | max diff vs merged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        cells = [r["adapter"], r["r"], r["targets"], f"+{r['lora_flops_pct']:.1f}%", f"{r['merged_b1_p50_ms']:.2f}",
                 f"{r['switchable_b1_p50_ms']:.2f}", f"{r['b1_overhead_pct']:+.1f}%",
                 f"{r['b1_cpu_overhead_pct']:+.1f}%", f"{r['merged_b32_per_s']:.1f}",
                 f"{r['switchable_b32_per_s']:.1f}", f"{r['b32_overhead_pct']:+.1f}%",
                 f"{r['b32_cpu_overhead_pct']:+.1f}%", f"{r['max_abs_diff']:.1e}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "LoRA FLOPs: the adapter's branch arithmetic per token against the base's linear layers (the "
              "least batch-32 cost of computing the branches). b32 overhead: how much lower the switchable "
              "throughput is. CPU time: process CPU seconds per call instead of wall clock.", "",
              "| adapter | merge_adapter b1 p50 ms | b1 overhead | merge_adapter b32 /s | b32 overhead "
              "| max diff vs merged |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['adapter']} | {r['merge_b1_p50_ms']:.2f} | {r['merge_b1_overhead_pct']:+.1f}% | "
                     f"{r['merge_b32_per_s']:.1f} | {r['merge_b32_overhead_pct']:+.1f}% | "
                     f"{r['merge_max_abs_diff']:.1e} |")
    lines += ["", "merge_adapter: the same switchable export with each adapter merged into its own session at run "
              "time (EmbeddingModel.merge_adapter), against the merged export of that adapter.", "",
              "| adapter | b1 p50 staying on it (ms) | b1 p50 switching every call (ms) | switch cost |",
              "|---|---|---|---|"]
    for label, key in (("", "switch_cost"), (" (merge_adapter)", "switch_cost_merge_adapter")):
        for name, s in report.get(key, {}).items():
            lines.append(f"| {name}{label} | {s['stay_p50_ms']:.2f} | {s['switch_p50_ms']:.2f} | "
                         f"{s['switch_cost_pct']:+.1f}% |")
    if report.get("batch_rotation"):
        lines += ["", "| batch 32, over the three adapters | staying on one adapter /s | a different adapter every "
                  "batch /s | cost |", "|---|---|---|---|"]
        for mode, b in report["batch_rotation"].items():
            lines.append(f"| {mode} | {b['stay_per_s']:.1f} | {b['rotate_per_s']:.1f} | "
                         f"{b['rotation_cost_pct']:+.1f}% |")
    mem, disk = report["memory"], report["disk"]
    n = report["settings"]["memory_adapters"]
    if mem:
        lines += ["", "| resident memory of one process | RSS MB | peak MB |", "|---|---|---|",
                  f"| base + {n} adapters (switchable) | {mem['switchable']['rss_mb']:.0f} | "
                  f"{mem['switchable']['peak_mb']:.0f} |",
                  f"| base + {n} adapters, all merged with merge_adapter | {mem['merge_adapter']['rss_mb']:.0f} | "
                  f"{mem['merge_adapter']['peak_mb']:.0f} |",
                  f"| {n} merged models | {mem['merged']['rss_mb']:.0f} | {mem['merged']['peak_mb']:.0f} |",
                  f"| (python + imports, before loading) | {mem['switchable']['rss_before_mb']:.0f} | |"]
    lines += ["", "| on disk | MB |", "|---|---|",
              f"| merged model (model.onnx) | {disk['merged_model_bytes'] / 1e6:.1f} |"]
    lines += [f"| adapter file {name} | {size / 1e6:.2f} |" for name, size in disk["adapter_file_bytes"].items()]
    settings = report["settings"]
    spinning = ("spinning off (SessionSettings.throughput())" if settings.get("spinning_off")
                else "default settings (threads spin during runs)")
    lines += ["", f"- {settings['queries']} short real queries (batch 1), {settings['sentences']} real sentences "
              f"at batch 32; {settings['rounds']} rounds, contenders in alternating blocks; ONNX Runtime intra-op "
              f"threads: {settings['threads'] or 'default (all cores)'}"
              f"; {spinning}.",
              f"- {n} merged models are measured as {n} sessions of one merged export (each session holds its own "
              "copy of the weights, as different merged models would); the adapters are synthetic copies of the "
              "three real ones with perturbed weights (same ranks and layouts).",
              f"- whole run: {report['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
