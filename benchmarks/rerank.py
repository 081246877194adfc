"""Reranker speed and ranking agreement (issue 25 item 6): 1 real query x 100 real passages at batch 32, on the
MiniLM-L6 reranker (all-MiniLM-L6-v2's real weights, a trained head, a trained LoRA adapter with the head in
``modules_to_save``; ``peft_export.bench.minilm_reranker`` builds it, or pass ``--base``/``--adapter``).

Contenders, each timed in its own process, the order reversed every other round:

* eager ``CrossEncoder(base)`` + ``load_adapter(adapter)`` (torch): the reference;
* sentence-transformers' own ``CrossEncoder(..., backend="onnx")`` and ``backend="openvino"`` on a hand-merged
  copy (PEFT ``merge_and_unload``, saved as a plain transformers folder): their backends take no adapters, so this
  is the best a user can do today. Their optional packages cannot live beside this project's transformers, so each
  runs under its own interpreter (``--peer-onnx-python``, ``--peer-openvino-python``; docs/benchmarks.md);
* ours: ``merge-onnx`` (ORT fp32), ``merge-onnx --quantize int8`` (the gated int8 export), ``merge-openvino`` run
  with ``inference_precision="bf16"``, each opened with ``CrossEncoderModel``.

Each child scores the 100 pairs (raw logits: identity activation everywhere, so no activation differs) ``--repeats``
times after warm-up calls; a round's figure is the p50 of those calls, and the table shows the median over rounds:
p50 latency of the 100-pair request and pairs/s (100 / p50). Ranking agreement of every contender with eager:
Spearman's rank correlation and the overlap of the top 10, plus the largest logit difference.

    python benchmarks/rerank.py prepare --work /tmp/bench-rerank \\
        --peer-onnx-python /work/peer-onnx/bin/python --peer-openvino-python /work/peer-ov/bin/python
    python benchmarks/rerank.py run --work /tmp/bench-rerank --rounds 4 --out benchmarks/results/DATE \\
        --peer-onnx-python /work/peer-onnx/bin/python --peer-openvino-python /work/peer-ov/bin/python

``prepare`` builds (or reuses) the model, the hand-merged copy, the peers' saved ONNX / OpenVINO folders and our
exports; a step that fails is recorded with the last line of its error in ``prepare-status.json`` and its
contender is skipped by ``run``, which says why. Figures for issue 25 are measured on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from peft_export.bench.child import run_child

# (name, precision class, runner, spec): runner "main" is this interpreter, "onnx"/"openvino" the peers'.
CONTENDERS = [
    ("eager CrossEncoder + PEFT", "reference", "main", "eager"),
    ("ST CrossEncoder onnx (hand-merged)", "fp32", "onnx", "st:st-onnx:onnx"),
    ("ST CrossEncoder openvino (hand-merged)", "bf16", "openvino", "st:st-openvino:openvino"),
    ("ours ORT fp32", "fp32", "main", "ours:ours-onnx"),
    ("ours ORT int8 (gated)", "int8", "main", "ours:ours-onnx-int8"),
    ("ours OpenVINO bf16", "bf16", "main", "ours:ours-openvino@bf16"),
]
COLUMNS = [("contender", "contender", ""), ("class", "class", ""), ("p50_ms", "p50 ms (all pairs)", ".1f"),
           ("pairs_per_s", "pairs/s", ".0f"), ("vs_peer", "x best ST of class", ".2f"),
           ("vs_eager", "x eager", ".2f"), ("spearman", "Spearman vs eager", ".4f"),
           ("top10_overlap", "top-10 overlap vs eager", ".2f"), ("max_score_diff", "max logit diff", ".2e"),
           ("load", "1-min load per round", "")]
STATUS_FILE = "prepare-status.json"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no error output)"


# ----------------------------------------------------------------------------------------------- child process
def child(args) -> None:
    """Load one contender, score the pairs ``--repeats`` times, write the timings and the logits. Imports only what
    the contender needs (and the torch-free harness), so it runs under a peer interpreter with this checkout on
    PYTHONPATH."""
    import numpy as np

    from peft_export.bench.timing import time_single_queries

    texts = json.loads(args.texts_file.read_text())
    pairs = [(texts["query"], passage) for passage in texts["passages"]]
    kind, _, rest = args.spec.partition(":")
    if kind in ("eager", "st"):
        import torch
        from sentence_transformers import CrossEncoder

        if kind == "eager":
            model = CrossEncoder(str(args.base), device="cpu")
            model.load_adapter(str(args.adapter))
        else:
            folder, _, backend = rest.partition(":")
            model = CrossEncoder(str(args.work / folder), backend=backend, device="cpu")

        def score():
            with torch.inference_mode():
                return model.predict(pairs, batch_size=32, activation_fn=torch.nn.Identity(),
                                     convert_to_numpy=True)
    else:
        from peft_export import CrossEncoderModel

        folder, _, precision = rest.partition("@")
        model = CrossEncoderModel(args.work / folder, **({"inference_precision": precision} if precision else {}))

        def score():
            return model.predict(pairs, batch_size=32, activation_fn="identity")

    # Warm-up inside the timer: first-call allocations, OpenVINO's first compilation of a shape.
    timing = time_single_queries(lambda _: score(), [None] * args.repeats, warmup=3)
    np.save(str(args.result) + ".npy", np.asarray(score(), dtype=np.float32).reshape(len(pairs)))
    args.result.write_text(json.dumps({"p50_ms": timing["p50_ms"], "calls": timing["n"]}))


# ----------------------------------------------------------------------------------------------- prepare
PEER_SAVE = """
import sys
from sentence_transformers import CrossEncoder
merged, backend, out = sys.argv[1:4]
CrossEncoder(merged, backend=backend, device="cpu").save_pretrained(out)
"""


def model_paths(args) -> tuple[Path, Path]:
    """``--base``/``--adapter``, else the MiniLM reranker built (once) by peft_export.bench.minilm_reranker."""
    if args.base and args.adapter:
        return args.base.resolve(), args.adapter.resolve()
    if args.base or args.adapter:
        raise SystemExit("pass both --base and --adapter, or neither (the MiniLM-L6 reranker is then built)")
    try:
        from peft_export.bench.minilm_reranker import build
    except ImportError as err:
        raise SystemExit(f"peft_export.bench.minilm_reranker is not in this checkout ({err}); pass --base BASE "
                         "--adapter ADAPTER (a CrossEncoder folder and its adapter-only folder)") from err
    return build(args.reranker_dir)


def prepare(args) -> None:
    from peft_export.bench.builders import hand_merged_sequence_classifier

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = model_paths(args)
    status_path = work / STATUS_FILE
    status = json.loads(status_path.read_text()) if status_path.exists() else {}

    def step(name: str, command: list[str]) -> None:
        if (work / name).exists():
            print(f"{name}: already there")
            return
        print(f"{name}: {' '.join(command)}", flush=True)
        done = run_child(command)
        ok = done["rc"] == 0 and (work / name).exists()
        status[name] = {"ok": ok, "wall_s": round(done["wall_s"], 1)}
        if not ok:
            status[name]["error"] = _last_line(done["stderr"]) if done["stderr"].strip() else f"exit {done['rc']}"
            print(f"{name}: FAILED, its contender will be skipped: {status[name]['error']}", flush=True)
        else:
            print(f"{name}: done in {status[name]['wall_s']} s", flush=True)

    merged = hand_merged_sequence_classifier(base, adapter, work / "merged")
    step("st-onnx", [str(args.peer_onnx_python), "-c", PEER_SAVE, str(merged), "onnx", str(work / "st-onnx")])
    step("st-openvino", [str(args.peer_openvino_python), "-c", PEER_SAVE, str(merged), "openvino",
                         str(work / "st-openvino")])
    cli = [sys.executable, "-m", "peft_export.cli"]
    source = [str(adapter), "--base", str(base)]
    step("ours-onnx", [*cli, "merge-onnx", *source, "-o", str(work / "ours-onnx")])
    step("ours-onnx-int8", [*cli, "merge-onnx", *source, "--quantize", "int8", "-o", str(work / "ours-onnx-int8")])
    step("ours-openvino", [*cli, "merge-openvino", *source, "-o", str(work / "ours-openvino")])
    status["model"] = {"base": str(base), "adapter": str(adapter)}
    status_path.write_text(json.dumps(status, indent=2))


# ----------------------------------------------------------------------------------------------- run
def run(args) -> None:
    import numpy as np

    from peft_export.bench.report import Report
    from peft_export.bench.rounds import alternating_rounds
    from peft_export.bench.texts import rerank_query_and_passages
    from peft_export.tasks.reranker import quality_against

    work: Path = args.work
    status_path = work / STATUS_FILE
    if not status_path.exists():
        raise SystemExit(f"{status_path} not found: run `prepare` with the same --work first")
    status = json.loads(status_path.read_text())
    base, adapter = Path(status["model"]["base"]), Path(status["model"]["adapter"])
    scratch = work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    texts_file = scratch / "texts.json"
    query, passages = rerank_query_and_passages(args.passages)
    texts_file.write_text(json.dumps({"query": query, "passages": passages}))
    pythons = {"main": sys.executable, "onnx": str(args.peer_onnx_python), "openvino": str(args.peer_openvino_python)}
    contenders = {name: (cls, runner, spec) for name, cls, runner, spec in CONTENDERS
                  if not args.only or any(o in name for o in args.only)}
    skipped: dict[str, str] = {}
    for name, (_, _, spec) in list(contenders.items()):
        folder = spec.split(":")[1].split("@")[0] if spec.startswith(("st:", "ours:")) else None
        if folder and not (work / folder).exists():
            reason = status.get(folder, {}).get("error", "prepare did not write it")
            skipped[name] = f"{folder} missing: {reason}"
            del contenders[name]
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}", flush=True)

    def measure(name: str) -> dict | None:
        if name in skipped:
            return None
        _, runner, spec = contenders[name]
        out = scratch / f"run-{len(list(scratch.glob('run-*')))}"
        load = Path("/proc/loadavg").read_text().split()[0]
        done = run_child([pythons[runner], __file__, "child", "--work", str(work), "--spec", spec, "--base",
                          str(base), "--adapter", str(adapter), "--texts-file", str(texts_file), "--result",
                          str(out), "--repeats", str(args.repeats)])
        if done["rc"] != 0:
            skipped[name] = f"its process failed (exit {done['rc']}): {_last_line(done['stderr'])}"
            print(f"skipping {name}: {skipped[name]}", flush=True)
            return None
        return {**json.loads(out.read_text()), "scores": np.load(str(out) + ".npy"), "load": load}

    results = alternating_rounds(list(contenders), args.rounds, measure)
    results = {name: [r for r in runs if r is not None] for name, runs in results.items() if name not in skipped}
    medians = {name: statistics.median(r["p50_ms"] for r in runs) for name, runs in results.items()}
    eager = CONTENDERS[0][0]
    reference = results[eager][0]["scores"] if eager in results else None
    report = Report(f"MiniLM-L6 reranker + trained LoRA: 1 query x {len(passages)} passages, batch 32")
    for name, runs in results.items():
        cls = contenders[name][0]
        row = {"contender": name, "class": cls, "p50_ms": medians[name],
               "pairs_per_s": len(passages) / (medians[name] / 1000), "load": " ".join(r["load"] for r in runs)}
        peers = [medians[n] for n in results if contenders[n][0] == cls and n.startswith("ST ")]
        if name.startswith("ours") and peers:
            row["vs_peer"] = min(peers) / row["p50_ms"]
        if eager in medians:
            row["vs_eager"] = medians[eager] / row["p50_ms"]
        if reference is not None:
            quality = quality_against(reference, runs[0]["scores"])
            row.update({k: quality[k] for k in ("spearman", "top10_overlap", "max_score_diff")})
        report.rows.append(row)
    report.notes += [f"{args.rounds} rounds, each contender in a fresh process, order reversed every other round; a "
                     f"round's figure is the p50 of {args.repeats} calls scoring all {len(passages)} pairs (after "
                     "3 warm-up calls); the table shows the median over rounds; pairs/s = pairs / p50",
                     "scores are raw logits (identity activation) everywhere; agreement is with eager's logits",
                     "x best ST of class: the fastest sentence-transformers path of the same precision class "
                     "(its p50 / ours); x eager: eager's p50 / this one's",
                     f"query: {query!r}; passages: the demo corpus' held-out passages (stdlib documentation)",
                     f"command: {' '.join(sys.argv)}"]
    report.notes += [f"skipped {name}: {reason}" for name, reason in skipped.items()]
    report.extra["prepare"] = status
    print(report.write(Path(args.out), "rerank", COLUMNS).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["prepare", "run", "child"])
    parser.add_argument("--work", type=Path, required=True, help="folder for the exports and scratch files")
    parser.add_argument("--base", type=Path, help="the base CrossEncoder folder (default: the MiniLM reranker)")
    parser.add_argument("--adapter", type=Path, help="its PEFT adapter folder (default: the MiniLM reranker's)")
    parser.add_argument("--reranker-dir", type=Path,
                        help="where the MiniLM reranker is built and cached (default: minilm_reranker's own)")
    parser.add_argument("--peer-onnx-python", type=Path, default=Path(sys.executable))
    parser.add_argument("--peer-openvino-python", type=Path, default=Path(sys.executable))
    parser.add_argument("--passages", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per contender per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--only", action="append", default=[], help="run only contenders whose name has this")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    if args.phase == "child":
        child(args)
    elif args.phase == "prepare":
        prepare(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
