#!/usr/bin/env python
"""kill -9 an `peft-export embed` job at random moments and check that each re-run finishes bit-identical.

Each trial starts the job (folder, FILE.parquet or FILE.npy output; one or two processes), kills it with SIGKILL
(the whole process group, workers included) at one moment, runs the same command again until it exits 0, and
compares the result with an uninterrupted run of the same output kind: the vectors and ids must be equal bit for
bit, the state must say complete, and no ``*.tmp`` may be left. The moments are the phases that random timing
rarely hits (after the last part, during assembly, after the complete state; through
PEFT_EXPORT_EMBED_KILL_AFTER_PART), random parts before or after their state file, and random delays.

    python scripts/embed_kill_resume.py EXPORT_FOLDER --trials 20 --rows 3000
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KILL_ENV = "PEFT_EXPORT_EMBED_KILL_AFTER_PART"
KINDS = ("out", "out.parquet", "out.npy")


def command(export: Path, source: Path, output: Path, part_rows: int, processes: int) -> list[str]:
    return [sys.executable, "-m", "peft_export.cli", "embed", str(export), str(source), "-o", str(output),
            "--part-rows", str(part_rows), "--processes", str(processes), "--quiet",
            *([] if output.suffix == ".npy" else ["--id-column", "id"])]


def run(args: list[str], env: dict, kill_after: float | None = None) -> int:
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    if kill_after is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # kill -9, workers included
    _, err = process.communicate()
    if process.returncode not in (0, -9):
        raise SystemExit(f"embed exited {process.returncode}: {err.decode()[-2000:]}")
    return process.returncode


def result_of(output: Path) -> tuple[np.ndarray, list | None]:
    if output.suffix == ".npy":
        return np.load(output), None
    import pyarrow.parquet as pq

    table = pq.read_table(output)
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(), dtype=np.float32)
    return vectors.reshape(table.num_rows, -1), table.column("id").to_pylist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--part-rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    work = Path(tempfile.mkdtemp(prefix="embed-kill-"))
    try:
        from peft_export.demo import load_sentences

        sentences = load_sentences()
        source = work / "corpus.jsonl"
        import json

        with open(source, "w", encoding="utf-8") as f:  # rows not a multiple of part_rows: a short last part
            for i in range(args.rows):
                f.write(json.dumps({"id": f"doc-{i}", "text": sentences[i % len(sentences)]}) + "\n")
        parts = -(-args.rows // args.part_rows)
        clean, seconds = {}, {}
        for kind in KINDS:
            started = time.perf_counter()
            run(command(args.export, source, work / f"clean-{kind}", args.part_rows, 1), env)
            seconds[kind] = time.perf_counter() - started
            clean[kind] = result_of(work / f"clean-{kind}")
        moments = ["last", "assembly", "complete"]
        identical = kills = 0
        for trial in range(args.trials):
            kind = KINDS[trial % len(KINDS)] if trial < 3 else rng.choice(KINDS)
            processes = rng.choice((1, 2))
            if trial < len(moments):
                moment, env_kill, delay = moments[trial], moments[trial], None
            elif rng.random() < 0.4:
                part = rng.randrange(parts)
                moment = env_kill = f"{part}{rng.choice(('', ':before-state'))}"
                delay = None
            else:
                delay = rng.uniform(0.5, seconds[kind] * 1.2)
                moment, env_kill = f"after {delay:.1f} s", None
            output = work / f"t{trial}-{kind}"
            argv = command(args.export, source, output, args.part_rows, processes)
            code = run(argv, {**env, KILL_ENV: env_kill} if env_kill else env, kill_after=delay)
            while code == 0 and delay is not None:  # finished before the delay: kill earlier on a fresh output
                shutil.rmtree(output, ignore_errors=True)
                for leftover in work.glob(f"{output.name}*"):
                    shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
                delay *= 0.5
                moment = f"after {delay:.1f} s"
                code = run(argv, env, kill_after=delay)
            kills += code == -9
            reruns = 0
            while run(argv, env) != 0:
                reruns += 1
            vectors, ids = result_of(output)
            want_vectors, want_ids = clean[kind]
            leftovers = list(work.rglob("*.tmp"))
            same = np.array_equal(vectors, want_vectors) and ids == want_ids and not leftovers
            identical += same
            print(f"trial {trial + 1:2d}: {kind:12s} {processes} process(es), kill at {moment:24s} "
                  f"{'killed' if code == -9 else 'finished first'}; resumed: "
                  f"{'bit-identical' if same else 'DIFFERENT'}{', tmp files left' if leftovers else ''}")
        print(f"{kills} kills in {args.trials} trials; {identical} of {args.trials} resumed bit-identical to an "
              f"uninterrupted run")
        return 0 if identical == args.trials else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
