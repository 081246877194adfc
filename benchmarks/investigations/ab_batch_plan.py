"""Would an optimal batch partition make the reranker faster? (issue 25's bf16 row)

The current plan (``peft_export.runtime.batches.plan_batches``) against a dynamic programme over the length-sorted
order that minimises, over batch boundaries, ``runs x RUN_COST + padded tokens`` under the same caps (batch size,
token budget). Both plans score the same request in one process, alternating, ``--calls`` times each after a
warm-up call; prints each plan's batches and padded tokens, and the p50 of each.

    python benchmarks/investigations/ab_batch_plan.py --export W/ours-openvino --texts W/scratch/texts.json \\
        --precision bf16 --run-cost 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

import peft_export.runtime.tokenizer as tokenizer_module
from peft_export import CrossEncoderModel
from peft_export.runtime.batches import plan_batches


def optimal_plan(run_cost: int):
    def plan(lengths: list[int], batch_size: int, max_batch_tokens: int | None = None) -> list[np.ndarray]:
        order = np.argsort([-n for n in lengths], kind="stable")
        width = [max(lengths[i], 1) for i in order]
        best = [0.0] + [float("inf")] * len(order)  # best[j]: least cost of the first j inputs
        cut = [0] * (len(order) + 1)
        for j in range(1, len(order) + 1):
            for i in range(max(0, j - batch_size), j):
                if max_batch_tokens is not None and j - i > 1 and (j - i) * width[i] > max_batch_tokens:
                    continue
                cost = best[i] + run_cost + (j - i) * width[i]
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        batches, j = [], len(order)
        while j > 0:
            batches.append(order[cut[j]:j])
            j = cut[j]
        return batches[::-1]
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, type=Path)
    parser.add_argument("--texts", required=True, type=Path, help="JSON with 'query' and 'passages'")
    parser.add_argument("--precision", help="OpenVINO inference precision (f32, bf16)")
    parser.add_argument("--run-cost", type=int, default=64, help="tokens one more run is worth")
    parser.add_argument("--calls", type=int, default=12)
    args = parser.parse_args()
    texts = json.loads(args.texts.read_text())
    pairs = [(texts["query"], passage) for passage in texts["passages"]]
    model = CrossEncoderModel(args.export, **({"inference_precision": args.precision} if args.precision else {}))
    lengths = [len(e.ids) for e in model._tokenizer.tokenize_pairs(pairs)]
    plans = {"current": plan_batches, "optimal": optimal_plan(args.run_cost)}
    for name, plan in plans.items():
        batches = plan(lengths, 32, model.max_batch_tokens)
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        print(json.dumps({"plan": name, "batches": [len(b) for b in batches], "padded_tokens": int(padded),
                          "real_tokens": sum(lengths)}))
    times: dict[str, list[float]] = {name: [] for name in plans}
    for call in range(args.calls):
        for name in (list(plans) if call % 2 == 0 else list(reversed(plans))):
            tokenizer_module.plan_batches = plans[name]  # what CrossEncoderModel.predict batches with
            model.predict(pairs, batch_size=32, activation_fn="identity")
            start = time.perf_counter()
            model.predict(pairs, batch_size=32, activation_fn="identity")
            times[name].append(time.perf_counter() - start)
    tokenizer_module.plan_batches = plan_batches
    p50 = {name: statistics.median(runs) * 1e3 for name, runs in times.items()}
    print(json.dumps({"p50_ms": {k: round(v, 1) for k, v in p50.items()},
                      "current_over_optimal": round(p50["current"] / p50["optimal"], 3)}))


if __name__ == "__main__":
    main()
