"""Run a contender in its own child process and measure its wall time and peak memory.

One way of measuring memory for every benchmark: while the child runs, its process tree is sampled (every 50 ms)
from /proc, and the peak is the larger of the highest sampled sum of the tree's resident memory and the kernel's own
high-water mark of the child (VmHWM, exact for a child that does its work in one process). ``ru_maxrss`` is not used:
it carries the parent's resident memory at fork time into the child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]


def child_env(pythonpath: str | Path | None = None) -> dict[str, str]:
    """This environment with ``pythonpath`` (default: the checkout holding this peft_export) first on PYTHONPATH, so
    that a child imports the same peft_export as this process."""
    first = str(pythonpath or REPO_ROOT)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [first, os.environ.get("PYTHONPATH")]))}


def python_command(*args: str) -> list[str]:
    """A command that runs this interpreter with ``args``."""
    return [sys.executable, *map(str, args)]


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (0 when it is gone)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            total += _status_kb(current, "VmRSS") * 1024
            with open(f"/proc/{current}/task/{current}/children") as fh:
                stack.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            continue
    return total


def resident_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (``VmRSS``) or at its peak (``VmHWM``), in MB (2**20 bytes)."""
    return _status_kb(os.getpid(), field) / 1024


def run_child(command: list[str], *, input: str | None = None, env: dict[str, str] | None = None,
              cwd: str | Path | None = None, timeout: float | None = None,
              kill_when: Callable[[], bool] | None = None, capture: bool = True) -> dict:
    """Run ``command`` to its end: wall seconds, peak RSS in MB (see the module's docstring), exit code, stdout, the
    end of stderr, and the 1-minute load average before and after. ``kill_when()`` returning True sends SIGKILL;
    past ``timeout`` seconds the child is killed too (rc -9)."""
    load_before = os.getloadavg()
    pipe = subprocess.PIPE if capture else None
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE if input is not None else None, stdout=pipe, stderr=pipe,
                            text=True, env=env or child_env(), cwd=cwd)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                own_peak = _status_kb(proc.pid, "VmHWM") * 1024
            except (OSError, ValueError):
                own_peak = 0
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid), own_peak)
            if kill_when is not None and kill_when():
                os.kill(proc.pid, signal.SIGKILL)
                return
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"wall_s": wall, "peak_rss_mb": peak[0] / 2**20, "rc": proc.returncode, "stdout": stdout or "",
            "stderr": (stderr or "")[-2000:], "load_before": load_before, "load_after": os.getloadavg()}


def must_succeed(result: dict, what: str) -> dict:
    """``result`` of :func:`run_child` when its exit code is 0; else exit naming ``what`` with the child's stderr."""
    if result["rc"] != 0:
        raise SystemExit(f"{what} failed (exit {result['rc']}): {result['stderr']}")
    return result
