"""Base-size speed and quality: peft_export's exports against every sentence-transformers path, on a real model.

The model is the real all-mpnet-base-v2 (110M) with a LoRA adapter trained on it (``scripts/real_mpnet.py DEST``
makes both). sentence-transformers' ONNX and OpenVINO backends refuse PEFT adapters, so their contenders run on a
hand-merged copy (PEFT's ``merge_and_unload``), the best a user can do with them today. Their optional packages
cannot live beside this project's transformers (optimum-onnx needs transformers < 4.58, optimum-intel 2.2 needs
5.5), so each peer runs under its own interpreter, given by ``--peer-onnx-python`` / ``--peer-openvino-python``
(docs/benchmarks.md, "Base-size model", has the two ``pip install`` lines).

    python scripts/real_mpnet.py /tmp/mpnet
    python benchmarks/bench_base_size.py prepare --model /tmp/mpnet --work /tmp/bench-mpnet \\
        --peer-onnx-python /tmp/peer-onnx/bin/python --peer-openvino-python /tmp/peer-ov/bin/python
    python benchmarks/bench_base_size.py run --model /tmp/mpnet --work /tmp/bench-mpnet \\
        --peer-onnx-python /tmp/peer-onnx/bin/python --peer-openvino-python /tmp/peer-ov/bin/python \\
        --out benchmarks/results/DATE

``prepare`` writes the hand-merged copy, the peers' ONNX, int8 ONNX (``export_dynamic_quantized_onnx_model``,
avx512_vnni) and OpenVINO folders, and our exports (ORT fp32, gated ORT int8, OpenVINO, gated OpenVINO
int8-static), recording each export's wall time. ``run`` times every contender in its own process, the order
reversed every other round: batch-1 latency (median over ``--queries`` held-out queries, each encoded alone) and
batch-32 throughput over ``--texts`` real texts of mixed length, then the mean and worst cosine of its embeddings to
eager sentence-transformers + PEFT. Each of ours is compared with the fastest sentence-transformers path of its
quality class (fp32-exact, bf16, int8), at batch 1 and at batch 32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from peft_export.bench.child import must_succeed, run_child
# (name, quality class, runner, spec): runner "main" is this interpreter, "onnx"/"openvino" the peers'.
CONTENDERS = [
    ("eager sentence-transformers + PEFT", "reference", "main", "eager"),
    ("ST onnx (hand-merged)", "fp32", "onnx", "st:st-onnx:onnx/model.onnx"),
    ("ST onnx int8 (avx512_vnni file)", "int8", "onnx", "st:st-onnx:onnx/model_qint8_avx512_vnni.onnx"),
    ("ST openvino (hand-merged)", "bf16", "openvino", "st:st-openvino:"),
    ("ours ORT fp32", "fp32", "main", "ours:ours-onnx"),
    ("ours ORT int8", "int8", "main", "ours:ours-onnx-int8"),
    ("ours OpenVINO bf16", "bf16", "main", "ours:ours-openvino@bf16"),
    ("ours OpenVINO int8-static", "int8", "main", "ours:ours-openvino-int8s"),
]
COLUMNS = [("contender", "contender", ""), ("class", "class", ""), ("b1_ms", "b1 p50 ms", ".1f"),
           ("b32_per_s", "b32 texts/s", ".1f"), ("b1_vs_peer", "b1 x best ST of class", ".2f"),
           ("b32_vs_peer", "b32 x best ST of class", ".2f"), ("b1_vs_eager", "b1 x eager", ".2f"),
           ("b32_vs_eager", "b32 x eager", ".2f"), ("mean_cosine", "mean cos vs eager", ".6f"),
           ("worst_cosine", "worst cos vs eager", ".6f"), ("load", "1-min load per round", "")]


# ----------------------------------------------------------------------------------------------- child process
def child(spec: str, model: Path, work: Path, texts_file: Path, out: Path) -> None:
    """Load one contender, time it, write its figures and embeddings. Imports only what the contender needs (and the
    torch-free harness), so it runs under a peer interpreter with this checkout on PYTHONPATH."""
    import numpy as np

    texts = json.loads(texts_file.read_text())
    queries, sentences = texts["queries"], texts["sentences"]
    kind, _, rest = spec.partition(":")
    if kind == "eager" or kind == "st":
        import torch
        from sentence_transformers import SentenceTransformer

        if kind == "eager":
            st = SentenceTransformer(str(model / "base"), device="cpu")
            st.load_adapter(str(model / "adapter"))
        else:
            folder, _, file_name = rest.partition(":")
            backend = "onnx" if folder == "st-onnx" else "openvino"
            kwargs = {"model_kwargs": {"file_name": file_name}} if file_name else {}
            st = SentenceTransformer(str(work / folder), backend=backend, device="cpu", **kwargs)

        def encode(batch: list[str], size: int):
            with torch.inference_mode():
                return st.encode(batch, batch_size=size)
    else:
        from peft_export import EmbeddingModel

        folder, _, precision = rest.partition("@")
        em = EmbeddingModel(work / folder, **({"inference_precision": precision} if precision else {}))

        def encode(batch: list[str], size: int):
            return em.encode(batch, batch_size=size)

    from peft_export.bench.timing import time_single_queries, time_throughput

    # Warm-up inside each timer: first-call allocations, OpenVINO's first compilation of a shape.
    b1 = time_single_queries(lambda text: encode([text], 1), queries, warmup=10)
    b32 = time_throughput(lambda batch: encode(batch, 32), sentences, repeats=1)
    np.save(str(out) + ".npy", np.asarray(encode(sentences, 32), dtype=np.float32))
    out.write_text(json.dumps({"b1_ms": b1["p50_ms"], "b32_per_s": b32["sentences_per_s"]}))


# ----------------------------------------------------------------------------------------------- prepare
PEER_ONNX = """
import sys
from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model
merged, out = sys.argv[1:3]
model = SentenceTransformer(merged, backend="onnx", device="cpu")
model.save_pretrained(out)
export_dynamic_quantized_onnx_model(model, "avx512_vnni", out)
"""
PEER_OPENVINO = """
import sys
from sentence_transformers import SentenceTransformer
merged, out = sys.argv[1:3]
SentenceTransformer(merged, backend="openvino", device="cpu").save_pretrained(out)
"""


def hand_merge(model: Path, out: Path) -> None:
    """What a user does today before sentence-transformers' ONNX / OpenVINO backends: merge with PEFT and save the
    weights, here into a copy of the base folder, so that it keeps the base's own (hub) format, which every
    sentence-transformers version reads (6.x writes module paths and configs that 5.x cannot read)."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model / "base"), device="cpu")
    merged = PeftModel.from_pretrained(st[0].auto_model, str(model / "adapter")).merge_and_unload()
    weights = {k: v.contiguous() for k, v in merged.state_dict().items()}
    base = load_file(str(model / "base" / "model.safetensors"))
    weights.update({k: base[k] for k in base.keys() - weights.keys() if k.endswith("position_ids")})  # buffers
    if weights.keys() != base.keys():  # the copy must load exactly like the base
        raise SystemExit(f"merged weights do not match the base's names: {sorted(weights.keys() ^ base.keys())[:5]}")
    shutil.copytree(model / "base", out)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


def prepare(args) -> None:
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def step(name: str, command: list[str]) -> None:
        if (work / name).exists():
            print(f"{name}: already there")
            return
        print(f"{name}: {' '.join(command)}", flush=True)
        done = run_child(command, capture=False)
        timings[name] = round(done["wall_s"], 1)
        print(f"{name}: exit {done['rc']} in {timings[name]} s", flush=True)

    if not (work / "merged-st").exists():
        hand_merge(args.model, work / "merged-st")
    step("st-onnx", [str(args.peer_onnx_python), "-c", PEER_ONNX, str(work / "merged-st"), str(work / "st-onnx")])
    step("st-openvino", [str(args.peer_openvino_python), "-c", PEER_OPENVINO, str(work / "merged-st"),
                         str(work / "st-openvino")])
    cli = [sys.executable, "-m", "peft_export.cli"]
    source = [str(args.model / "adapter"), "--base", str(args.model / "base")]
    step("ours-onnx", [*cli, "merge-onnx", *source, "-o", str(work / "ours-onnx")])
    step("ours-onnx-int8", [*cli, "merge-onnx", *source, "--quantize", "int8", "-o", str(work / "ours-onnx-int8")])
    step("ours-openvino", [*cli, "merge-openvino", *source, "-o", str(work / "ours-openvino")])
    step("ours-openvino-int8s", [*cli, "merge-openvino", *source, "--quantize", "int8-static",
                                 "-o", str(work / "ours-openvino-int8s")])
    record = work / "prepare-timings.json"
    earlier = json.loads(record.read_text()) if record.exists() else {}
    record.write_text(json.dumps({**earlier, **timings}, indent=2))
    print(json.dumps({**earlier, **timings}, indent=2))


# ----------------------------------------------------------------------------------------------- run
def run(args) -> None:
    import numpy as np

    from peft_export.bench.report import Report
    from peft_export.bench.rounds import alternating_rounds
    from peft_export.runtime.similarity import cosine_rows
    from peft_export.bench.texts import demo_queries_and_sentences

    work: Path = args.work
    scratch = work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    texts_file = scratch / "texts.json"
    queries, sentences = demo_queries_and_sentences(args.queries, args.texts)
    texts_file.write_text(json.dumps({"queries": queries, "sentences": sentences}))
    pythons = {"main": sys.executable, "onnx": str(args.peer_onnx_python), "openvino": str(args.peer_openvino_python)}
    contenders = {name: (cls, runner, spec) for name, cls, runner, spec in CONTENDERS
                  if not args.only or any(o in name for o in args.only)}
    missing = [n for n, (_, _, spec) in contenders.items()
               if spec.startswith(("st:", "ours:")) and not (work / spec.split(":")[1].split("@")[0]).exists()]
    for name in missing:
        print(f"skipping {name}: its folder is missing (prepare did not write it)")
        del contenders[name]

    def measure(name: str) -> dict:
        cls, runner, spec = contenders[name]
        out = scratch / f"run-{len(list(scratch.glob('run-*.npy')))}"
        load = Path("/proc/loadavg").read_text().split()[0]
        must_succeed(run_child([pythons[runner], __file__, "child", "--model", str(args.model), "--work", str(work),
                                "--spec", spec, "--texts-file", str(texts_file), "--result", str(out)],
                               capture=False), name)
        return {**json.loads(out.read_text()), "embeddings": np.load(str(out) + ".npy"), "load": load}

    results = alternating_rounds(list(contenders), args.rounds, measure)
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in ("b1_ms", "b32_per_s")}
               for name, runs in results.items()}
    eager_name = CONTENDERS[0][0]
    reference = results[eager_name][0]["embeddings"] if eager_name in results else None
    report = Report(f"all-mpnet-base-v2 (real, 110M) + trained LoRA r=16: {args.texts} texts, "
                    f"{args.queries} single queries")
    for name, runs in results.items():
        cls = contenders[name][0]
        row = {"contender": name, "class": cls, **medians[name], "load": " ".join(r["load"] for r in runs)}
        peers = [medians[n] for n in results if contenders[n][0] == cls and n.startswith("ST ")]
        if name.startswith("ours") and peers:
            row["b1_vs_peer"] = min(p["b1_ms"] for p in peers) / row["b1_ms"]
            row["b32_vs_peer"] = row["b32_per_s"] / max(p["b32_per_s"] for p in peers)
        if eager_name in medians:
            row["b1_vs_eager"] = medians[eager_name]["b1_ms"] / row["b1_ms"]
            row["b32_vs_eager"] = row["b32_per_s"] / medians[eager_name]["b32_per_s"]
        if reference is not None:
            cos = cosine_rows(runs[0]["embeddings"], reference)
            row.update(mean_cosine=float(cos.mean()), worst_cosine=float(cos.min()))
        report.rows.append(row)
    timings = work / "prepare-timings.json"
    report.notes += [f"{args.rounds} rounds, each contender in a fresh process, order reversed every other round; "
                     f"b1 = median latency over {args.queries} held-out queries encoded alone (after 10 warm-up "
                     f"calls); b32 = one pass over {args.texts} demo-corpus texts at batch 32",
                     "x best ST of class: ours against the fastest sentence-transformers path of the same quality "
                     "class (b1: its latency / ours; b32: ours / its rate)",
                     f"command: {' '.join(sys.argv)}"]
    if timings.exists():
        report.extra["prepare_seconds"] = json.loads(timings.read_text())
        report.notes.append(f"export wall times (s, from prepare): {timings.read_text().strip()}")
    md = report.write(Path(args.out), "bench_base_size", COLUMNS)
    print(md.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["prepare", "run", "child"])
    parser.add_argument("--model", type=Path, required=True, help="folder with base/ and adapter/ (real_mpnet.py)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the exports and scratch files")
    parser.add_argument("--peer-onnx-python", type=Path, default=Path(sys.executable))
    parser.add_argument("--peer-openvino-python", type=Path, default=Path(sys.executable))
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", action="append", default=[], help="run only contenders whose name has this")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model, args.work = args.model.resolve(), args.work.resolve()
    if args.phase == "child":
        child(args.spec, args.model, args.work, args.texts_file, args.result)
    elif args.phase == "prepare":
        prepare(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
