"""Executors run one engine step on every worker: in this process, or on Ray actors.

Bring-up is the same named sequence for both (see ``runtime.worker``), so the Ray path differs
from the local one only in where the Worker object lives.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from cluster.config import EngineConfig
from collectives.factory import default_backend
from runtime.loader import ModelSource
from runtime.worker import StepResult, Worker
from scheduler.batch import ScheduledBatch
from scheduler.config import SchedulerConfig
from scheduler.errors import TilerunError

log = logging.getLogger(__name__)


class WorkerDiedError(TilerunError, RuntimeError):
    """A worker actor died; the message names its rank and device."""


class ClusterCapacityError(TilerunError, RuntimeError):
    """The cluster cannot place the requested workers."""


def comm_backend(comm: str, device_type: str) -> str:
    """The backend name ``comm`` (``auto``: the usual one for ``device_type``)."""
    return comm if comm != "auto" else default_backend(device_type)


class _Executor:
    """The bring-up sequence and the per-step calls, whatever runs the workers (``_all``)."""

    device_infos: list[dict]
    num_blocks: int  # device tier
    num_host_blocks: int  # host tier (0: none)

    def _all(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every worker, in rank order; their results."""
        raise NotImplementedError

    def _bring_up(self, tp: int, comm: str) -> None:
        self.device_infos = self._all("init_device")
        if tp > 1:
            rdv = self._rank0("open_rendezvous", comm)
            self._all("init_communicator", comm, rdv)
        self._all("load_model")
        caps = self._all("kv_cache_capacity")
        self.num_blocks = min(c["device_blocks"] for c in caps)
        self.num_host_blocks = min(c["host_blocks"] for c in caps)
        self._all("init_kv_cache", self.num_blocks, self.num_host_blocks)
        self._all("warm_up")

    def _rank0(self, method: str, *args: Any) -> Any:
        """Call ``method`` on rank 0 only."""
        raise NotImplementedError

    def execute(self, batch: ScheduledBatch, logits: str = "none") -> StepResult:
        # one call per worker per step; rank 0 returns the sampled tokens
        return self._all("execute", batch, logits)[0]

    def memory_stats(self) -> list[dict]:
        return self._all("memory_stats")

    def reset_peak_memory(self) -> None:
        self._all("reset_peak_memory")


class LocalExecutor(_Executor):
    """One worker in this process (TP = 1): tests, notebooks, single-device runs without Ray."""

    def __init__(self, config: EngineConfig, model: ModelSource, limits: SchedulerConfig) -> None:
        self.worker = Worker(config.worker, model, limits)
        self._bring_up(1, "gloo")

    def _all(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def shutdown(self) -> None:
        self.worker.shutdown()


class RayExecutor(_Executor):
    """``tp`` worker actors, one per device, in one placement group."""

    def __init__(self, config: EngineConfig, model: ModelSource, limits: SchedulerConfig) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from cluster.ray_cluster import ensure_ray
        from cluster.worker_actor import WorkerActor

        cc = config.cluster
        tp = cc.tp
        self._ray = ray
        self.cluster = ensure_ray(cc.ray_address)
        device_type = _device_type(config.worker.device)
        bundle, actor_opts = _bundle_for(device_type)
        bundles = [dict(bundle) for _ in range(tp)]
        # PACK keeps a node's workers together (contiguous ranks per node).
        self.pg = placement_group(bundles, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=cc.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            have = {k: v for k, v in ray.cluster_resources().items() if "node:" not in k}
            raise ClusterCapacityError(
                f"asked for {tp} worker(s) with {bundle} each (tp={tp} on "
                f"{device_type}); the cluster has {have}; waited {cc.placement_timeout_s:.0f}s. "
                f"Fix: lower --tp to what the cluster holds, add nodes, or use --device cpu"
            ) from None
        self.comm = comm_backend(cc.comm, device_type)
        runtime_env = None
        if self.comm == "mpi" and tp > 1:
            from cluster.mpi_env import mpi_runtime_env

            runtime_env = mpi_runtime_env()
        threads = max(1, int((os.cpu_count() or 1) / tp)) if device_type == "cpu" else None
        per_node = _ranks_on_node(self.pg)
        self.workers = []
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
                    ).remote(
                        config.worker, model, limits, rank, tp, threads, per_node[bundle_index]
                    )
                )
            self._bring_up(tp, self.comm)
        except BaseException:
            self.shutdown()
            raise

    def _rank0(self, method: str, *args: Any) -> Any:
        return self._get([getattr(self.workers[0], method).remote(*args)])[0]

    @property
    def device_names(self) -> list[str]:
        return [f"{i['device']} ({i['name']})" for i in getattr(self, "device_infos", [])]

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


def _ranks_on_node(pg) -> list[int]:
    """Per bundle: how many of the group's workers share its node (they share its cores)."""
    from ray.util import placement_group_table

    where = placement_group_table(pg).get("bundles_to_node_id", {})
    n = len(pg.bundle_specs)
    nodes = [where.get(i, where.get(str(i))) for i in range(n)]
    return [max(1, sum(1 for x in nodes if x == nodes[i])) if nodes[i] else n for i in range(n)]


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
