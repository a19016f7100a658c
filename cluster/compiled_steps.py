"""The per-step call of every rank as one Ray Compiled Graph: ``steps(packet)`` on each worker.

A compiled graph moves each step through shared-memory channels that the workers' loops read,
instead of a scheduled actor call per worker per step (0.18 ms instead of 1.2 ms for one actor
on an idle 2-core machine, see NOTES.md). A compiled graph's result can be taken only once and
not given up after a timeout, so a collector thread takes the results, in submission order, and
hands them to the waiting ``Ticket``; a watcher thread wakes every waiter the moment a worker's
loop ends (its actor died, or the graph was torn down). The executor's deadline, health check and
error naming stay where they are (``cluster.executor``): they only need ``Ticket.wait`` to return
on time.

Packets and results cross the graph as bytes, pickled here and in ``WorkerActor.steps`` with the
standard library's C pickler: the graph's own serializer (cloudpickle, object by object) cost
the driver more than the rest of its per-step work on a small model. Only our own objects
travel this way, between our own processes.

A graph's reader waits by spinning (Ray's ``PlasmaObjectHeader::ReadAcquire`` polls the
channel's version with ``sched_yield``), so the collector, waiting for a step's results, keeps
a core busy for the whole step. Where the ranks compute on the CPU that core is one of theirs:
an 8K-token prefill ran at ~1,800 instead of ~2,850 tokens/s on two cores. With ``wake`` (ranks
on the driver's node) each rank writes a byte into a FIFO when its step is done and the
collector sleeps in ``read`` until every rank's byte is there; only then does it read the
results, which by then are (all but) written.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pickle
import shutil
import tempfile
import threading
from typing import Any

# Seconds the graph's first, empty execution may take (bring-up: the loops start reading).
FIRST_EXECUTION_S = 60.0


class Ticket:
    """One execution of the graph: one outcome per rank, once the collector has them."""

    def __init__(self, refs: list) -> None:
        self.refs = refs
        self.event = threading.Event()
        # per rank: (True, value) or (False, the rank's error as Ray raised it)
        self.outcome: list[tuple[bool, Any]] | None = None
        self.fatal: BaseException | None = None  # the channel broke (a death or a teardown)

    def wait(self, timeout: float) -> bool:
        """Until the collector has this execution's outcome (or the channel broke); False after
        ``timeout`` seconds without it."""
        return self.event.wait(timeout)


class CompiledSteps:
    """``send(packet) -> Ticket``; ``loops``: each rank's graph loop (ends when its actor dies).

    A packet is ``(batch | None, logits, hold)`` and each rank's outcome the list of results
    ``Worker.advance`` returned: with ``hold`` a step's result comes back with the next
    execution, so the executor maps results to steps in order, not tickets to steps."""

    def __init__(self, workers: list, max_in_flight: int, wake: bool = False) -> None:
        """``wake``: the ranks share the driver's node; the collector sleeps until they say
        their step is done rather than spin on the channel (module docstring)."""
        import ray
        from ray.dag import InputNode, MultiOutputNode

        self._ray = ray
        self._ranks = len(workers)
        self._wake_fd: int | None = None
        self._wake_dir: str | None = None
        if wake:
            self._wake_dir = tempfile.mkdtemp(prefix="tilerun-wake-")
            path = os.path.join(self._wake_dir, "steps")
            os.mkfifo(path, 0o600)
            # read-write: the open does not wait for a writer, and _fail_all can wake the reader
            self._wake_fd = os.open(path, os.O_RDWR)
            ray.get([w.open_wake.remote(path) for w in workers])  # before their graph loops
        with InputNode() as packet:
            dag = MultiOutputNode([w.steps.bind(packet) for w in workers])
        # a submit beyond the executor's own in-flight limit never reaches the graph
        self.graph = dag.experimental_compile(_max_inflight_executions=max_in_flight + 1)
        self.loops = [self.graph.worker_task_refs[w] for w in workers]
        self.ended = False
        self._cv = threading.Condition()
        self._queue: collections.deque[Ticket] = collections.deque()
        self._closed = False
        for target, name in ((self._collect, "collector"), (self._watch, "watcher")):
            threading.Thread(target=target, name=f"tilerun-steps-{name}", daemon=True).start()
        # One empty execution now, while every rank is alive: the driver registers as the
        # reader of the result channels on its first read, and Ray's teardown of a graph whose
        # reader never registered, after a rank died, aborts the whole driver process
        # (a failed CHECK in experimental_mutable_object_provider.cc, seen in CI).
        first = self.send((None, "none", 0))
        error = None
        if not first.event.wait(FIRST_EXECUTION_S):
            error = f"took over {FIRST_EXECUTION_S:.0f} s"
        elif first.fatal is not None or not all(ok for ok, _ in first.outcome or []):
            error = f"failed: {first.fatal or first.outcome}"
        if error:
            self.close(broken=True)
            raise RuntimeError(f"the step graph's first (empty) execution {error}")

    def send(self, packet: Any) -> Ticket:
        ticket = Ticket(self.graph.execute(pickle.dumps(packet, pickle.HIGHEST_PROTOCOL)))
        with self._cv:
            self._queue.append(ticket)
            self._cv.notify_all()
        return ticket

    def _collect(self) -> None:
        try:
            self._collect_until_closed()
        finally:  # the FIFO's reader: closed here, never under a read or a late wake-up
            with self._cv:
                fd, self._wake_fd = self._wake_fd, None
            if fd is not None:
                os.close(fd)

    def _collect_until_closed(self) -> None:
        from ray.exceptions import RayTaskError

        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed and not self._queue:
                    return
                ticket = self._queue[0]
            if self._wake_fd is not None:
                self._await_ranks()
                if self._closed:  # woken by _fail_all: the tickets are failed already
                    return
            outcome = []
            try:
                for ref in ticket.refs:
                    try:
                        outcome.append((True, pickle.loads(ref.get(timeout=-1))))
                    except RayTaskError as e:  # the rank's step raised; the graph goes on
                        outcome.append((False, e))
            except BaseException as e:  # noqa: BLE001 - the channel is gone: every ticket fails
                self._fail_all(e)
                return
            ticket.outcome = outcome
            with self._cv:
                self._queue.popleft()
            ticket.event.set()

    def _await_ranks(self) -> None:
        """Sleep until every rank has said that its step of the oldest ticket is done (one byte
        each; a later step's bytes stay in the FIFO for the next ticket)."""
        got = 0
        while got < self._ranks:
            try:
                got += len(os.read(self._wake_fd, self._ranks - got))
            except OSError:  # the FIFO is gone (the process is going down): stop waiting
                return

    def _watch(self) -> None:
        with contextlib.suppress(Exception):
            self._ray.wait(self.loops, num_returns=1, timeout=None)
        self.ended = True
        self._fail_all(RuntimeError("a worker's step loop ended"))

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            waiting = list(self._queue)
            self._queue.clear()
            self._closed = True
            self._cv.notify_all()
            if self._wake_fd is not None:  # a collector asleep in _await_ranks wakes, leaves
                with contextlib.suppress(OSError):
                    os.write(self._wake_fd, b"\0" * self._ranks)
        for t in waiting:
            if t.outcome is None and t.fatal is None:
                t.fatal = error
            t.event.set()

    def close(self, broken: bool) -> None:
        """Tear the graph down. A broken group (a rank dead, stopped or stuck in a collective) is
        killed by the caller first; Ray then logs each loop it could not cancel, which says
        nothing the caller has not already reported."""
        quiet = logging.getLogger("ray.dag.compiled_dag_node")
        level = quiet.level
        if broken:
            quiet.setLevel(logging.CRITICAL)
        try:
            with contextlib.suppress(Exception):
                self.graph.teardown()
        finally:
            quiet.setLevel(level)
        self._fail_all(RuntimeError("the step graph was torn down"))
        if self._wake_dir is not None:
            shutil.rmtree(self._wake_dir, ignore_errors=True)
            self._wake_dir = None
