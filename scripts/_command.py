"""The command line a benchmark result records, with the environment switches that change which
kernels run (a figure taken under ``TILERUN_PREFILL_PATH=gluon`` must say so to be reproduced)."""

from __future__ import annotations

import os
import sys

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
