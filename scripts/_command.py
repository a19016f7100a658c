"""The command line a benchmark result records, with the environment switches that change which
kernels run (a figure taken under ``TILERUN_PREFILL_PATH=gluon`` must say so to be reproduced)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# only switches that pick kernels: nothing else of the environment goes into a results file
KERNEL_SWITCHES = (
    "TILERUN_PREFILL_PATH",
    "TILERUN_EXPERT_GEMV",
    "TILERUN_FUSED_OPS",
    "TILERUN_MPI_CUDA_AWARE",
)


def command_line() -> str:
    """``VAR=value ... python script args``, the switches set in this process first."""
    env = [f"{k}={os.environ[k]}" for k in KERNEL_SWITCHES if k in os.environ]
    return " ".join([*env, "python", *sys.argv])


def write_result(result: dict, out: str | None, default: str) -> Path:
    """Write a benchmark's result as JSON to ``out`` (else ``default``, a path under
    ``benchmarks/results/``), say where, and return the path."""
    path = Path(out or default)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path


def best_ms(fn, reps: int) -> float:
    """Milliseconds of ``fn``'s fastest of ``reps`` calls after one warm-up (a CPU benchmark on a
    shared machine: the best call is the cost of the work itself)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def poll(pred, timeout: float, every: float = 0.2):
    """``pred()``'s first true value, checked every ``every`` seconds; None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    return None
