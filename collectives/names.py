"""Communication backend names, importable without torch (configs and the CLI list them)."""

from __future__ import annotations

TORCH_BACKENDS = ("nccl", "hccl", "gloo")  # served by collectives.torch_dist
COMM_BACKENDS = (*TORCH_BACKENDS, "mpi")  # every name a communicator can be built for
