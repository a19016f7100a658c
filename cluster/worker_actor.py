"""The Ray actor around ``runtime.worker.Worker``: one per device, nothing else."""

from __future__ import annotations

import cProfile
import os
import pickle
import time

import ray
import torch

from cluster.pipe_steps import PacketReader, error_body, write_reply
from runtime.loader import ModelSource
from runtime.worker import StepResult, Worker
from runtime.worker_config import WorkerConfig
from scheduler.config import SchedulerConfig


# The health check runs on its own thread, so a rank busy in a step (or blocked in a collective
# waiting for a stalled peer) still answers it; a stopped or hung process does not.
@ray.remote(max_restarts=0, concurrency_groups={"health": 1, "steps": 1})
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
        self._failed_step: str | None = None  # the last step's error, for the health check
        # TILERUN_PROFILE_DIR: profile this rank's per-step calls (cProfile) and count the time
        # spent in them against the time between them, written there at shutdown
        self._profile_dir = os.environ.get("TILERUN_PROFILE_DIR")
        self._profile = cProfile.Profile() if self._profile_dir else None
        self._busy_s, self._calls, self._first_call, self._last_call = 0.0, 0, 0.0, 0.0
        self._wake: int | None = None  # the driver's FIFO (cluster.compiled_steps)
        self._late_error: Exception | None = None  # a held launch's, for the next reply (pipes)
        if ranks_on_node:
            # accelerator workers keep Ray's one torch thread for their own work; the CPU part of
            # cooperative attention takes this node's cores / its ranks (Worker.init_device)
            self.ranks_on_node = ranks_on_node

    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        return self.rank

    @ray.method(concurrency_group="health")
    def failed_step(self) -> str | None:
        """The error of this rank's last step, if it failed (the health check asks: on a
        compiled graph the others wait for a rank's result in a collective, not for its error)."""
        return self._failed_step

    def step(self, packet: tuple) -> StepResult:
        """One engine step, ``packet = (batch, logits)``: the per-step call of plain calls."""
        if self._profile is not None:
            return self._profiled(self._noting_failure, self.execute, *packet)
        return self._noting_failure(self.execute, *packet)

    def steps(self, packet: bytes) -> bytes:
        """The compiled graph's node: ``Worker.advance(batch | None, logits, hold)`` (it launches
        step i+1 before it returns step i), packet and results pickled (``cluster.compiled_steps``
        says why)."""
        if self._profile is not None:
            return self._profiled(self._steps, packet)
        return self._steps(packet)

    def _steps(self, packet: bytes) -> bytes:
        try:
            results = self._noting_failure(self.advance, *pickle.loads(packet))
            return pickle.dumps(results, pickle.HIGHEST_PROTOCOL)
        finally:
            if self._wake is not None:  # done (or failed): the driver's collector may read
                os.write(self._wake, b"\1")

    @ray.method(concurrency_group="steps")
    def serve_pipe(self, steps_path: str, results_path: str) -> None:
        """The pipe transport's loop (``cluster.pipe_steps``): each packet read from the FIFO at
        ``steps_path`` is one step (``_pipe_step``), replied to on ``results_path`` (rank 0's
        results; the other ranks' are not read, so they send none). Returns when the driver
        closes its end; a step that raises is replied to with its error and the loop goes on.
        It runs on a thread of its own, as a compiled graph's loop does, so that the driver's
        other calls (memory statistics, shutdown) still reach the actor."""
        out = os.open(results_path, os.O_WRONLY)  # the driver holds the other end already
        try:
            steps = os.open(steps_path, os.O_RDONLY)
            try:
                reader = PacketReader(steps)
                while (packet := reader.next()) is not None:
                    try:
                        if self._profile is not None:
                            self._profiled(self._pipe_step, packet, out)
                        else:
                            self._pipe_step(packet, out)
                    except BrokenPipeError:  # the driver closed first: nobody waits for it
                        return
            finally:
                os.close(steps)
        finally:
            os.close(out)

    def _pipe_step(self, packet: bytes, out: int) -> None:
        """One packet from the pipes, ``(batch | None, logits, hold)``, replied to on ``out``.

        A held step (``hold`` >= 1) is replied to before it is launched: the reply carries the
        older steps' results (``take_held(hold - 1)``: the same ones ``advance`` would return),
        so the driver's work on them (applying the tokens, scheduling and sending the next
        step) overlaps this step's launch instead of waiting for it. A launch that then fails
        is said in the next reply (the driver's flush at the end of a run asks for one)."""
        held = False
        try:
            if self._late_error is not None:
                error, self._late_error = self._late_error, None
                raise error
            batch, logits, hold = pickle.loads(packet)
            held = batch is not None and hold > 0
            if held:
                results = self._noting_failure(self.take_held, hold - 1)
            else:
                results = self._noting_failure(self.advance, batch, logits, hold)
            body = pickle.dumps(results, pickle.HIGHEST_PROTOCOL) if self.rank == 0 else b""
        except Exception as e:  # noqa: BLE001 - the driver names it and the rank
            write_reply(out, False, error_body(e))
            return
        write_reply(out, True, body)
        if held:
            try:
                self._noting_failure(self.hold_step, batch, logits)
            except Exception as e:  # noqa: BLE001 - said with the next packet's reply
                self._late_error = e

    def open_wake(self, path: str) -> None:
        """Say on the FIFO at ``path`` when each graph step is done, so that the driver waits
        for results asleep instead of spinning on the channel (``cluster.compiled_steps``)."""
        if self._wake is not None:
            os.close(self._wake)
        self._wake = os.open(path, os.O_WRONLY)

    def _profiled(self, fn, *args):
        t0 = time.perf_counter()
        self._first_call = self._first_call or t0
        self._profile.enable()
        try:
            return fn(*args)
        finally:
            self._profile.disable()
            self._busy_s += time.perf_counter() - t0
            self._calls += 1
            self._last_call = time.perf_counter()

    def shutdown(self) -> None:
        if self._profile is not None and self._calls:
            base = os.path.join(self._profile_dir, f"worker-{self.rank}-{os.getpid()}")
            self._profile.dump_stats(base + ".prof")
            span = self._last_call - self._first_call
            with open(base + ".txt", "w") as f:
                f.write(f"calls {self._calls} busy_s {self._busy_s:.4f} span_s {span:.4f}\n")
        super().shutdown()

    def _noting_failure(self, fn, *args):
        try:
            return fn(*args)
        except BaseException as e:
            self._failed_step = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"
            raise

    @ray.method(concurrency_group="health")
    def pid(self) -> int:
        """This worker's process id (tests use it to stop or kill one rank)."""
        return os.getpid()

    def where(self) -> dict:
        """The process and Ray node this worker lives in (status tables, recovery tests)."""
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}
