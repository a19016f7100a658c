"""Executors run one engine step on every worker: in this process, or on Ray actors.

Bring-up is the same named sequence for both (see ``runtime.worker``), so the Ray path differs
from the local one only in where the Worker object lives.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from runtime.engine_config import EngineConfig
from scheduler.errors import ConfigError, TilerunError
from runtime.worker import StepResult, Worker
from scheduler.batch import ScheduledBatch

log = logging.getLogger(__name__)


class WorkerDiedError(TilerunError, RuntimeError):
    """A worker actor died; the message names its rank and device."""


class ClusterCapacityError(TilerunError, RuntimeError):
    """The cluster cannot place the requested workers."""


def comm_backend(config: EngineConfig, device_type: str) -> str:
    if config.comm != "auto":
        return config.comm
    return {"cuda": "nccl", "npu": "hccl"}.get(device_type, "gloo")


class LocalExecutor:
    """One worker in this process (TP = 1): tests, notebooks, single-device runs without Ray."""

    def __init__(self, config: EngineConfig, max_model_len: int) -> None:
        if config.tp != 1:
            raise ConfigError(
                f"tp={config.tp} needs the Ray executor; the local executor runs tp=1"
            )
        self.worker = Worker(config)
        self.device_infos = [self.worker.init_device()]
        self.worker.load_model()
        self.num_blocks = self.worker.kv_cache_capacity(max_model_len)
        self.worker.init_kv_cache(self.num_blocks)
        self.worker.warm_up(max_model_len)

    def execute(self, batch: ScheduledBatch, logits: str = "none") -> StepResult:
        return self.worker.execute(batch, logits)

    def memory_stats(self) -> list[dict]:
        return [self.worker.memory_stats()]

    def reset_peak_memory(self) -> None:
        self.worker.reset_peak_memory()

    def shutdown(self) -> None:
        self.worker.shutdown()


class RayExecutor:
    """``tp`` worker actors, one per device, in one placement group."""

    def __init__(
        self,
        config: EngineConfig,
        max_model_len: int,
        address: str | None = None,
    ) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from cluster.ray_cluster import ensure_ray
        from cluster.worker_actor import WorkerActor

        self._ray = ray
        self.cluster = ensure_ray(address)
        device_type = _device_type(config.device)
        bundle, actor_opts = _bundle_for(device_type)
        bundles = [dict(bundle) for _ in range(config.tp)]
        # PACK keeps a node's workers together (contiguous ranks per node).
        self.pg = placement_group(bundles, strategy="PACK")
        placement_timeout_s = config.placement_timeout_s
        try:
            ray.get(self.pg.ready(), timeout=placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            have = {k: v for k, v in ray.cluster_resources().items() if "node:" not in k}
            raise ClusterCapacityError(
                f"asked for {config.tp} worker(s) with {bundle} each (tp={config.tp} on "
                f"{device_type}); the cluster has {have}; waited {placement_timeout_s:.0f}s. "
                f"Fix: lower --tp to what the cluster holds, add nodes, or use --device cpu"
            ) from None
        self.comm = comm_backend(config, device_type)
        runtime_env = None
        if self.comm == "mpi" and config.tp > 1:
            from cluster.mpi_env import mpi_runtime_env

            runtime_env = mpi_runtime_env()
        threads = max(1, int((os.cpu_count() or 1) / config.tp)) if device_type == "cpu" else None
        self.workers = []
        self.device_names: list[str] = []
        try:
            for rank, bundle_index in enumerate(_bundles_by_node(self.pg)):
                opts = dict(actor_opts)
                if runtime_env:
                    opts["runtime_env"] = runtime_env
                self.workers.append(
                    WorkerActor.options(
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            placement_group=self.pg, placement_group_bundle_index=bundle_index
                        ),
                        name=None,
                        **opts,
                    ).remote(config, rank, config.tp, threads)
                )
            self.device_infos = self._all("init_device")
            self.device_names = [f"{i['device']} ({i['name']})" for i in self.device_infos]
            if config.tp > 1:
                rdv = self._get([self.workers[0].open_rendezvous.remote(self.comm)])[0]
                self._all("init_communicator", self.comm, rdv)
            self._all("load_model")
            self.num_blocks = min(self._all("kv_cache_capacity", max_model_len))
            self._all("init_kv_cache", self.num_blocks)
            self._all("warm_up", max_model_len)
        except BaseException:
            self.shutdown()
            raise

    def _all(self, method: str, *args: Any) -> list[Any]:
        return self._get([getattr(w, method).remote(*args) for w in self.workers])

    def _get(self, refs: list) -> list[Any]:
        ray = self._ray
        try:
            # Take results as they come, so a dead worker is reported at once even while the
            # other ranks still wait for it inside a collective.
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done[0])
            return ray.get(refs)
        except ray.exceptions.RayActorError as e:
            rank = _dead_rank(ray, refs)
            where = (
                f"rank {rank} on {self.device_names[rank]}"
                if rank is not None and rank < len(self.device_names)
                else f"rank {rank}"
            )
            raise WorkerDiedError(f"worker {where} died: {e}") from None
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if hasattr(e, "cause") else e
            if isinstance(cause, TilerunError):
                raise cause from None
            raise

    def execute(self, batch: ScheduledBatch, logits: str = "none") -> StepResult:
        # one RPC per worker per step; rank 0 returns the sampled tokens
        return self._get([w.execute.remote(batch, logits) for w in self.workers])[0]

    def memory_stats(self) -> list[dict]:
        return self._all("memory_stats")

    def reset_peak_memory(self) -> None:
        self._all("reset_peak_memory")

    def shutdown(self) -> None:
        ray = self._ray
        from ray.util.placement_group import remove_placement_group

        for w in getattr(self, "workers", []):
            # best effort: the kill below is what frees the actor
            with contextlib.suppress(Exception):
                ray.get(w.shutdown.remote(), timeout=10)
            ray.kill(w, no_restart=True)
        self.workers = []
        if getattr(self, "pg", None) is not None:
            remove_placement_group(self.pg)
            self.pg = None


def _bundles_by_node(pg) -> list[int]:
    """Bundle indices ordered so that each node's workers get contiguous ranks."""
    from ray.util import placement_group_table

    where = placement_group_table(pg).get("bundles_to_node_id", {})
    first_seen: dict[str, int] = {}
    for i in sorted(where):
        first_seen.setdefault(where[i], i)
    return sorted(range(len(pg.bundle_specs)), key=lambda i: (first_seen.get(where.get(i), i), i))


def _dead_rank(ray, refs: list) -> int | None:
    """The rank whose call failed because its actor died (calls still running are not it)."""
    for rank, ref in enumerate(refs):
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError:
            return rank
        except Exception:  # noqa: BLE001 - still running, or failed for another reason
            continue
    return None


def _device_type(device: str) -> str:
    kind = device.partition(":")[0]
    if kind != "auto":
        return kind
    import torch

    from runtime.device import npu_available

    if torch.cuda.is_available():
        return "cuda"
    return "npu" if npu_available() else "cpu"


def _bundle_for(device_type: str) -> tuple[dict, dict]:
    """Placement-group bundle and actor options for one worker on ``device_type``."""
    if device_type == "cuda":
        return {"GPU": 1, "CPU": 1}, {"num_gpus": 1, "num_cpus": 1}
    if device_type == "npu":
        # Ascend NPUs appear to Ray as a custom resource named "NPU".
        return {"NPU": 1, "CPU": 1}, {"resources": {"NPU": 1}, "num_cpus": 1}
    return {"CPU": 1}, {"num_cpus": 1}
