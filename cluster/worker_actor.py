"""The Ray actor around ``runtime.worker.Worker``: one per device, nothing else."""

from __future__ import annotations

import ray
import torch

from runtime.loader import ModelSource
from runtime.worker import Worker
from runtime.worker_config import WorkerConfig
from scheduler.config import SchedulerConfig


@ray.remote(max_restarts=0)
class WorkerActor(Worker):
    def __init__(
        self,
        config: WorkerConfig,
        model: ModelSource,
        limits: SchedulerConfig,
        rank: int,
        world_size: int,
        threads: int | None = None,
        ranks_on_node: int | None = None,
    ) -> None:
        if threads:
            # CPU workers share the node's cores: one torch thread pool per worker, no oversubscription
            torch.set_num_threads(threads)
        super().__init__(config, model, limits, rank, world_size)
        if ranks_on_node:
            # accelerator workers keep Ray's one torch thread for their own work; the CPU part of
            # cooperative attention takes this node's cores / its ranks (Worker.init_device)
            self.ranks_on_node = ranks_on_node

    def ping(self) -> int:
        return self.rank
