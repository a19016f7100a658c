"""The engine actor: ``tilerun-engine`` in namespace ``tilerun``, detached, one per cluster.

It owns the workers (``tilerun-worker-<rank>``, created by it, so they die with it) and runs
``ServiceLoop`` in a thread; its methods answer while the loop runs (a threaded actor). Once the
workers are up it serves the status page (loopback, behind Ray's token) and exports the
snapshot as Ray metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray

from cluster.service.loop import ServiceLoop
from cluster.service.spec import ServiceSpec


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=8)
class EngineActor:
    def __init__(self, spec: dict[str, Any], home: str, ray_address: str) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.loop = ServiceLoop(ServiceSpec.from_dict(spec), Path(home), ray_address)
        self.loop.start()
        self.page = None
        self.metrics = None

    def _watch(self) -> str | None:
        """Start the status page and the metrics pump (once); the page's URL."""
        if self.page is None:
            from cluster.service.metrics import ServiceMetrics
            from cluster.service.status_page import StatusPage

            self.page = StatusPage(self.loop.snapshot)
            self.page.start()
            self.metrics = ServiceMetrics()
            self.metrics.start(self.loop.snapshot)
        return self.page.url

    def ready(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """Wait until the workers are up; raises the bring-up error (a TilerunError names the fix)."""
        if not self.loop.ready.wait(timeout_s):
            raise TimeoutError(f"the workers were not ready after {timeout_s:.0f}s")
        if self.loop.error is not None:
            raise self.loop.error
        return {**self.loop.describe(), "status_page": self._watch()}

    def snapshot(self) -> dict[str, Any]:
        """Engine, workers, tasks, throughput and counters as plain JSON (SERVICE.md)."""
        return self.loop.snapshot()

    def shutdown(self) -> None:
        """Stop the loop and the workers; the tasks stay in the store (running ones resume on the
        next ``tilerun up``)."""
        if self.metrics is not None:
            self.metrics.stop()
        if self.page is not None:
            self.page.stop()
        self.loop.stop()

    def pid(self) -> int:
        import os

        return os.getpid()
