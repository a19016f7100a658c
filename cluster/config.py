"""Configuration by layer, composed: what the cluster needs, and the engine's whole config.

``SchedulerConfig`` (``scheduler/config.py``), ``WorkerConfig`` (``runtime/worker_config.py``)
and ``ClusterConfig`` (here) each hold the fields their layer uses; ``EngineConfig`` composes
them and builds from one flat dict of user-facing fields (the Python API's keyword arguments,
a job file, the CLI flags), which is the one list the CLI and job files are derived from.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from collectives.names import COMM_BACKENDS
from runtime.worker_config import WorkerConfig
from scheduler.config import SchedulerConfig
from scheduler.errors import ConfigError
from scheduler.fields import check_fields, option, user_fields

EXECUTORS = ("ray", "local")
STEP_TRANSPORTS = ("auto", "pipe", "compiled", "calls")


@dataclass(frozen=True)
class ClusterConfig:
    """Where the workers run and how they talk."""

    tp: int = option(1, help="tensor-parallel size: one worker per device", minimum=1)
    comm: str = option(
        "auto",
        help="communication backend: auto (nccl on CUDA, hccl on NPU, on CPU mpi for several ranks "
        "on one node where mpi4py and mpiexec are installed, else gloo)|" + "|".join(COMM_BACKENDS),
        choices=("auto", *COMM_BACKENDS),
    )
    executor: str = option(
        "ray", help="ray: one Ray actor per device; local: one worker in this process (tp=1)",
        choices=EXECUTORS,
    )  # fmt: skip
    ray_address: str | None = option(
        None, help="attach to this Ray cluster instead of starting an embedded one"
    )
    placement_timeout_s: float = option(
        60.0, help="seconds to wait for the cluster to place all workers", positive=True
    )
    step_timeout_s: float | None = option(
        None,
        help="seconds a call to the workers may run before they are health-checked and a rank "
        "that does not answer is named as stalled (default: 4 x the slowest step, at least 5 s)",
        positive=True,
    )

    step_transport: str = option(
        "auto",
        help="how each step reaches the Ray workers: pipe (FIFOs between the driver and workers "
        "on its node), compiled (a Ray Compiled Graph: shared-memory channels, no per-call "
        "scheduling), calls (one actor call per worker per step), auto (compiled for one CPU "
        "worker and for CPU ranks over MPI; otherwise pipe where every worker is on the driver's "
        "node, else compiled on accelerators and calls on CPU, where a graph's idle ranks spin)",
        choices=STEP_TRANSPORTS,
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.executor == "local" and self.tp != 1:
            raise ConfigError(f"tp={self.tp} needs the Ray executor; the local executor runs tp=1")


_LAYERS: dict[str, type] = {
    "scheduler": SchedulerConfig,
    "worker": WorkerConfig,
    "cluster": ClusterConfig,
}


@dataclass(frozen=True)
class EngineConfig:
    """One engine: the scheduler's, each worker's and the cluster's config."""

    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    worker: WorkerConfig = dataclasses.field(default_factory=WorkerConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)

    @staticmethod
    def options() -> list[tuple[type, dataclasses.Field]]:
        """Every user-facing field, as ``(owning config class, field)``, in declaration order."""
        return [(cls, f) for cls in _LAYERS.values() for f in user_fields(cls)]

    @staticmethod
    def field_names() -> list[str]:
        return [f.name for _, f in EngineConfig.options()]

    @staticmethod
    def from_dict(values: dict[str, Any]) -> EngineConfig:
        """Build from flat user-facing fields; unknown fields fail, naming each."""
        valid = EngineConfig.field_names()
        unknown = [k for k in values if k not in valid]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), valid, n=1)
                hints.append(f"{k} (did you mean {close[0]}?)" if close else str(k))
            extra = ""
            if "seed" in unknown:
                extra = "; seed is a sampling field (SamplingParams(seed=...)): a preset's weights take weights_seed"
            raise ConfigError(
                f"unknown engine field(s) {', '.join(hints)}{extra}; valid: {', '.join(valid)}"
            )
        parts = {
            layer: cls(**{f.name: values[f.name] for f in user_fields(cls) if f.name in values})
            for layer, cls in _LAYERS.items()
        }
        return EngineConfig(**parts)

    def to_dict(self) -> dict[str, Any]:
        """The flat user-facing fields (``from_dict``'s inverse)."""
        return {
            f.name: getattr(getattr(self, layer), f.name)
            for layer, cls in _LAYERS.items()
            for f in user_fields(cls)
        }
