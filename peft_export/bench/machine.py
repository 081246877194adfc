"""What machine a figure was measured on: CPU model and flags, cores, library versions, load."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

PACKAGES = ("peft_export", "torch", "transformers", "peft", "sentence-transformers", "onnxruntime", "onnxruntime-gpu",
            "openvino", "numpy", "tokenizers", "starlette", "uvicorn", "httpx", "ray")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The instruction-set flags that change which kernels run (AVX2, AVX-512, VNNI, BF16, AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "date_unix": int(time.time()),
        "loadavg": list(os.getloadavg()),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """One Markdown line describing ``machine`` (as :func:`machine_info` returns it)."""
    return (f"Machine: {machine.get('cpu')}, {machine.get('usable_cores')} usable cores, flags "
            f"{', '.join(machine.get('cpu_flags', []))}; Python {machine.get('python')}; "
            + ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items()))


def uptime() -> str:
    """`uptime`'s line (clock, load averages): recorded per section of a long run, to show what else ran."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
