"""The engine actor: ``tilerun-engine`` in namespace ``tilerun``, detached, one per cluster.

It owns the workers (``tilerun-worker-<rank>``, created by it, so they die with it) and runs
``ServiceLoop`` in a thread; its methods answer while the loop runs (a threaded actor). Once the
workers are up it serves the status page (loopback, behind Ray's token) and exports the
snapshot as Ray metrics.

When its process dies (a crash, the OOM killer, a kill), Ray starts it again, up to
``engine_restarts`` times (``tilerun up`` sets ``max_restarts``; -1: always), with the same
arguments on the same node. The new one rebuilds the workers, re-queues what the store still
calls running (an attempt counted, so a task that kills the engine every time ends failed after
``max_attempts``), and, with no ``tilerun up`` waiting on it, starts its status page and
records itself in ``engine.json`` on its own.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import ray

from cluster.service.home import read_json, remove_json, write_json
from cluster.service.loop import EXIT_RECORD, ServiceLoop
from cluster.service.spec import ServiceSpec

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=8)
class EngineActor:
    def __init__(self, spec: dict[str, Any], home: str, ray_address: str) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.home = Path(home)
        restarts = 0
        with warnings.catch_warnings():  # Ray 2.60 reads it through an API it deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted:
            restarts = int((read_json(self.home, "engine.json") or {}).get("restarts", 0)) + 1
        # what a loop that gave up wrote (a new `tilerun up` drops a stale one)
        gave_up = read_json(self.home, EXIT_RECORD) or {}
        remove_json(self.home, EXIT_RECORD)
        died = "its process died (a crash, the OOM killer, a kill)"
        why = (gave_up.get("reason") or died) if restarted else None
        self.loop = ServiceLoop(ServiceSpec.from_dict(spec), self.home, ray_address, restarts, why)
        self._watch_lock = threading.Lock()
        self.page = None
        self.metrics = None
        self.loop.start()
        if restarts:
            threading.Thread(target=self._come_back, name="tilerun-restart", daemon=True).start()

    def _watch(self) -> str | None:
        """Start the status page and the metrics pump (once); the page's URL."""
        with self._watch_lock:  # `tilerun up` (ready) and a restart (_come_back) may both ask
            if self.page is None:
                from cluster.service.metrics import ServiceMetrics
                from cluster.service.status_page import StatusPage

                self.page = StatusPage(self.loop.snapshot, task_fn=self.loop.task_view)
                self.page.start()
                self.metrics = ServiceMetrics()
                self.metrics.start(self.loop.snapshot)
            return self.page.url

    def _come_back(self) -> None:
        """After a restart: once the workers are up, what ``tilerun up`` would do (the page, the
        metrics, ``engine.json`` with the new page's URL and the restart count)."""
        self.loop.ready.wait()
        if self.loop.error is not None:  # the snapshot says so too (`tilerun status`)
            log.error("the restarted engine could not bring its workers up: %s", self.loop.error)
            return
        page = self._watch()
        while not self.loop.stopping.is_set():  # `tilerun down` came first: record nothing
            engine = self.loop.engine  # None while a worker death's rebuild runs: wait for it
            if engine is not None:
                info = self.loop.describe(engine)
                write_json(self.home, "engine.json", {**info, "status_page": page})
                break
            time.sleep(0.5)
        log.warning("engine restarted (restart %d): the workers are up again", self.loop.restarts)

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
