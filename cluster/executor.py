"""Executors run one engine step on every worker: in this process, or on Ray actors.

Bring-up is the same named sequence for both (see ``runtime.worker``), so the Ray path differs
from the local one only in where the Worker object lives.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pickle
import time
from typing import Any

from cluster.config import EngineConfig
from cluster.pipe_steps import RankError
from collectives.factory import default_backend
from runtime.loader import ModelSource
from runtime.worker import StepResult, Worker
from scheduler.batch import ScheduledBatch
from scheduler.config import SchedulerConfig
from scheduler.errors import ConfigError, TilerunError
from scheduler.table_deltas import TableSender

log = logging.getLogger(__name__)


class WorkerDiedError(TilerunError, RuntimeError):
    """A worker actor died; the message names its rank and device."""


class WorkerStalledError(TilerunError, RuntimeError):
    """A worker stopped answering within its step deadline; the message names its rank."""


class WorkerFailedError(TilerunError, RuntimeError):
    """A worker raised an unexpected error; the message names its rank and the error."""


class ClusterCapacityError(TilerunError, RuntimeError):
    """The cluster cannot place the requested workers."""


# A call may take this many times the slowest step so far before the ranks are health-checked.
STEP_DEADLINE_FACTOR = 4.0
# No call gets a deadline shorter than this. Passing it only triggers a health check: a rank that
# is busy (compiling kernels, a long prefill) still answers and the call goes on.
STEP_FLOOR_S = 5.0
# Seconds a rank has to answer a health check (it runs beside the step, on its own thread); a
# rank silent that long is asked once more, for twice as long, before it is named.
PING_TIMEOUT_S = 3.0
# Bring-up calls include starting the actor's process (imports, a first CUDA context), which a
# loaded host stretches to tens of seconds: they are health-checked only after this long.
BRING_UP_DEADLINE_S = 120.0
# Seconds to wait for the other ranks once one has failed, so a death is told from its echo.
SETTLE_S = 5.0
# Seconds a clean shutdown of the workers may take before they are killed.
SHUTDOWN_S = 5.0
# Steps the overlapped loop keeps in flight through a compiled graph on an accelerator (the
# device has that many steps queued while a result travels back and the next step travels out).
# Measured on the H200 (benchmarks/results/step-*-depths*-nvidia-h200.json): the 7B shape's
# step outlasts the hop at any depth; the demo model gained 0.788 -> 0.709 ms a step from 1 to
# 4 in one run and lost 0.701 -> 0.922 from 1 to 2 in another, so its limit is per-step CPU
# work, not the hop. One, until a depth wins every run; each step more is a step more
# discarded after a stop token.
COMPILED_DEPTH = 1
# The same through the pipes, which reply to a held step before they launch it (the driver's work
# on step i's tokens overlaps the launch of step i+d): at depth 1 the worker would wait for the
# step just before, and the device would idle while the next one is launched. Two keep one step
# on the device through each launch. Measured on the H200 with the demo model: see README.
PIPE_DEPTH = 2
# The most steps in flight any setting of ``pipeline_depth`` may ask of the compiled graph.
MAX_DEPTH = 4


class StepHandle:
    """One submitted step (``executor.submit``): ``result()`` waits for its ``StepResult``.

    Steps run and resolve in submission order; asking for a later step's result resolves the
    earlier ones first (their handles keep their results). ``result()`` raises the step's error
    (``WorkerDiedError``, ``WorkerStalledError``, ...), and so does every later handle's."""

    def __init__(self, executor: _Executor, ticket: Any = None) -> None:
        self._executor = executor
        self.ticket = ticket  # what the transport needs to collect the step
        self.submitted = time.monotonic()
        self._done = False
        self._result: StepResult | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """Whether ``result()`` would return (or raise) without waiting."""
        return self._done

    def result(self) -> StepResult:
        if not self._done:
            self._executor._resolve(self)
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def _set(self, result: StepResult | None, error: BaseException | None = None) -> None:
        self._result, self._error, self._done = result, error, True


def comm_backend(comm: str, device_type: str, tp: int = 1, one_node: bool = False) -> str:
    """The backend name ``comm`` (``auto``: the usual one for ``device_type``).

    ``auto`` for several CPU ranks on ``one_node`` is MPI where mpi4py and ``mpiexec`` are
    installed and the ranks do not outnumber the cores (MPI's shared-memory transport waits by
    polling): on a 2-core host an allreduce of 256 floats took 4.7 us through MPICH against
    1.9 ms through gloo's TCP loopback, and the demo model's TP=2 decode step 3.7 against
    18-22 ms (``tp2-comm-cpu.log``). Elsewhere gloo."""
    if comm != "auto":
        return comm
    several = device_type == "cpu" and tp > 1 and one_node and tp <= (os.cpu_count() or 1)
    if several and mpi_available():
        return "mpi"
    return default_backend(device_type)


def mpi_available() -> bool:
    """mpi4py importable and an ``mpiexec`` to start ranks with (``cluster.mpi_env``)."""
    import importlib.util

    from cluster.mpi_env import find_mpiexec

    if importlib.util.find_spec("mpi4py") is None:
        return False
    try:
        find_mpiexec()
    except RuntimeError:
        return False
    return True


class _Executor:
    """The bring-up sequence and the per-step calls, whatever runs the workers (``_all``)."""

    device_infos: list[dict]
    num_blocks: int  # device tier
    num_host_blocks: int  # host tier (0: none)
    # where rank 0 listens for the group: loopback, or the address Ray uses for its node
    rendezvous_host: str = "127.0.0.1"
    # steps the overlapped loop keeps in flight after each turn (``cluster.step_loop``)
    pipeline_depth: int = 1
    # send each sequence's block table as a delta against the last step's (tests turn it off)
    table_deltas: bool = True
    # keep the pickled size of each step's message in ``last_message_bytes`` (bench_step)
    measure_messages: bool = False
    last_message_bytes: int = 0
    # seconds of each bring-up phase, in order (ray_start, placement_group, init_device, ...)
    bring_up_s: dict[str, float]
    _sender: TableSender | None = None

    def _all(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every worker, in rank order; their results."""
        raise NotImplementedError

    def _bring_up(self, tp: int, comm: str) -> None:
        self.device_infos = self._timed("init_device")
        if tp > 1:
            rdv = self._rank0("open_rendezvous", comm, self.rendezvous_host)
            self._timed("init_communicator", comm, rdv)
        self._timed("load_model")
        caps = self._all("kv_cache_capacity")
        self.num_blocks = min(c["device_blocks"] for c in caps)
        self.num_host_blocks = min(c["host_blocks"] for c in caps)
        self._timed("init_kv_cache", self.num_blocks, self.num_host_blocks)
        self._timed("warm_up")

    def _timed(self, method: str, *args: Any) -> list[Any]:
        """``_all`` as one bring-up phase named after ``method``."""
        with self._phase(method):
            return self._all(method, *args)

    @contextlib.contextmanager
    def _phase(self, name: str):
        """Keep the seconds of the block in ``bring_up_s[name]`` (where time to ready goes);
        a phase that raises is not kept."""
        t0 = time.perf_counter()
        yield
        self.bring_up_s[name] = round(time.perf_counter() - t0, 3)

    def _rank0(self, method: str, *args: Any) -> Any:
        """Call ``method`` on rank 0 only."""
        raise NotImplementedError

    def submit(self, batch: ScheduledBatch, logits: str = "none", hold: bool = False) -> StepHandle:
        """Send one step to every rank; its handle's ``result()`` is rank 0's ``StepResult``.
        Batches go in the order the scheduler made them (block tables travel as deltas).
        ``hold``: the caller will most likely submit the next ``pipeline_depth`` steps before
        it asks for this one's result, so a transport may return this result with a later
        step's (the compiled graph does: the workers queue steps i+1..i+d before they send step
        i back); asking first still works, at the cost of one more exchange."""
        raise NotImplementedError

    def execute(self, batch: ScheduledBatch, logits: str = "none") -> StepResult:
        """One step, waited for: ``submit(batch, logits).result()``."""
        return self.submit(batch, logits).result()

    def _resolve(self, handle: StepHandle) -> None:
        """Wait until ``handle`` (and every step submitted before it) is resolved."""
        raise NotImplementedError

    def _message(self, batch: ScheduledBatch, logits: str) -> tuple:
        """What every rank receives for one step: the batch with block-table deltas."""
        if self.table_deltas:
            if self._sender is None:
                self._sender = TableSender()
            batch = self._sender.encode(batch)
        packet = (batch, logits)
        if self.measure_messages:
            self.last_message_bytes = len(pickle.dumps(packet, protocol=pickle.HIGHEST_PROTOCOL))
        return packet

    def memory_stats(self) -> list[dict]:
        return self._all("memory_stats")

    def set_allreduce(self, overlap: bool, tiles: int | None = None) -> None:
        self._all("set_allreduce", overlap, tiles)

    def reset_peak_memory(self) -> None:
        self._all("reset_peak_memory")


class LocalExecutor(_Executor):
    """One worker in this process (TP = 1): tests, notebooks, single-device runs without Ray."""

    def __init__(self, config: EngineConfig, model: ModelSource, limits: SchedulerConfig) -> None:
        self.bring_up_s = {}
        with self._phase("worker"):
            self.worker = Worker(config.worker, model, limits)
        self._bring_up(1, "gloo")

    def _all(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def submit(self, batch: ScheduledBatch, logits: str = "none", hold: bool = False):
        """The step's kernels are queued on the device and its tokens read back by ``result()``
        (``runtime.worker.PendingStep``, which has ``result()`` and ``done()`` as a handle does):
        on CUDA the driver's work for the next step overlaps this one; on CPU the step has run
        when this returns. ``hold`` changes nothing here: there is no hop to hide."""
        return self.worker.launch(*self._message(batch, logits))

    def _resolve(self, handle: StepHandle) -> None:
        pass  # every handle is resolved when submit returns

    def shutdown(self) -> None:
        self.worker.shutdown()


class RayExecutor(_Executor):
    """``tp`` worker actors, one per device, in one placement group."""

    def __init__(
        self,
        config: EngineConfig,
        model: ModelSource,
        limits: SchedulerConfig,
        actor_name_prefix: str | None = None,
        namespace: str | None = None,
        long_lived: bool = False,
    ) -> None:
        """``actor_name_prefix`` names the workers ``<prefix><rank>`` in ``namespace`` (the
        service's ``tilerun-worker-0``...), so Ray's dashboard and ``ray.get_actor`` find them.
        ``long_lived``: the engine idles between tasks (the service; ``step_transport``)."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from cluster.ray_cluster import ensure_ray
        from cluster.worker_actor import WorkerActor

        cc = config.cluster
        tp = cc.tp
        self._ray = ray
        self.broken = False
        self._error: BaseException | None = None  # what broke the group, raised again
        self.step_timeout_s = cc.step_timeout_s
        self._ready = False  # bring-up done
        self._steps = 0
        self._slowest_s = 0.0  # the slowest step after the first (which compiles kernels)
        self.pipeline_depth = 1  # COMPILED_DEPTH once a graph or pipes carry held steps
        self._pending: collections.deque[StepHandle] = collections.deque()
        self._last_done = 0.0  # when the last step's result came back
        # what carries each step to all ranks at once: PipeSteps (ranks on the driver's node),
        # CompiledSteps (a compiled graph), or None (one actor call per rank per step)
        self._channel = None
        # steps sent through the channel and not collected yet, oldest first; their results, in
        # order, are those of the pending steps (a held step's result comes with a later one)
        self._tickets: collections.deque = collections.deque()
        # whether a held step pays: on an accelerator ``launch`` only queues the step, so the
        # device runs step i+1 while step i's result travels; on CPU the step runs inside
        # ``launch`` and holding its result would only delay it (tests turn it on to check it)
        self.hold_steps = _device_type(config.worker.device) != "cpu"
        self.flushes = 0  # executions sent only to bring held steps back
        self.bring_up_s = {}
        with self._phase("ray_start"):
            self.cluster = ensure_ray(cc.ray_address)
        device_type = _device_type(config.worker.device)
        bundle, actor_opts = _bundle_for(device_type)
        bundles = [dict(bundle) for _ in range(tp)]
        # PACK keeps a node's workers together (contiguous ranks per node).
        self.pg = placement_group(bundles, strategy="PACK")
        try:
            with self._phase("placement_group"):
                ray.get(self.pg.ready(), timeout=cc.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            have = {k: v for k, v in ray.cluster_resources().items() if "node:" not in k}
            raise ClusterCapacityError(
                f"asked for {tp} worker(s) with {bundle} each (tp={tp} on "
                f"{device_type}); the cluster has {have}; waited {cc.placement_timeout_s:.0f}s. "
                "Fix: lower --tp to what the cluster holds or add nodes"
                + (", or use --device cpu" if device_type != "cpu" else "")
            ) from None
        order = _bundles_by_node(self.pg)
        self.rendezvous_host = _rendezvous_host(ray, self.pg, order[0])
        one_node = self.rendezvous_host == "127.0.0.1"  # every rank on one node
        self.comm = comm_backend(cc.comm, device_type, tp, one_node)
        here = _on_driver_node(ray, self.pg)
        self.step_transport = step_transport(
            cc.step_transport, device_type, tp, long_lived, self.comm, here
        )
        if self.step_transport == "pipe" and not here:
            remove_placement_group(self.pg)
            raise ConfigError(
                "step_transport=pipe needs every worker on the driver's node, and this group "
                "has workers on other nodes. Fix: step_transport=auto (or compiled)"
            )
        runtime_env = None
        if self.comm == "mpi" and tp > 1:
            from cluster.mpi_env import mpi_bind_env, mpi_runtime_env

            runtime_env = mpi_runtime_env(mpi_bind_env(self.rendezvous_host))
        threads = max(1, int((os.cpu_count() or 1) / tp)) if device_type == "cpu" else None
        per_node = _ranks_on_node(self.pg)
        self.workers = []
        try:
            for rank, bundle_index in enumerate(order):
                opts = dict(actor_opts)
                if actor_name_prefix:
                    opts["name"] = f"{actor_name_prefix}{rank}"
                    opts["namespace"] = namespace
                if runtime_env:
                    opts["runtime_env"] = runtime_env
                self.workers.append(
                    WorkerActor.options(
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            placement_group=self.pg, placement_group_bundle_index=bundle_index
                        ),
                        **opts,
                    ).remote(
                        config.worker, model, limits, rank, tp, threads, per_node[bundle_index]
                    )
                )
            self._bring_up(tp, self.comm)  # plain calls: each is health-checked on its own
            if self.step_transport == "pipe":
                from cluster.pipe_steps import PipeSteps

                with self._phase("open_pipes"):
                    try:
                        self._channel = PipeSteps(self.workers)
                    except Exception as e:
                        if cc.step_transport != "auto":
                            raise
                        # auto asked for the faster path, not for this one at any price
                        log.warning("no step pipes (%s): steps go as calls", _one_line(e))
                        self.step_transport = "calls"
            if self.step_transport == "compiled":
                from cluster.compiled_steps import CompiledSteps

                with self._phase("compile_graph"):
                    try:
                        wake = device_type == "cpu" and here  # ranks share the driver's FIFO
                        self._channel = CompiledSteps(self.workers, MAX_DEPTH + 1, wake)
                    except Exception as e:
                        if cc.step_transport != "auto":
                            raise
                        log.warning("no compiled step graph (%s): steps go as calls", _one_line(e))
                        self.step_transport = "calls"
            if self._channel is not None and self.hold_steps:
                self.pipeline_depth = (
                    PIPE_DEPTH if self.step_transport == "pipe" else COMPILED_DEPTH
                )
            self._ready = True
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

    def _get(self, refs: list, deadline_s: float | None = None) -> list[Any]:
        """Results of one call per rank, taken as they come. A dead rank is named at once; a
        rank that fails makes the others settle briefly so that a death is told from its echo
        (a survivor's "connection reset"); past ``deadline_s`` every rank is health-checked and
        one that does not answer is named as stalled (every call has a deadline: bring-up,
        steps, memory queries)."""
        ray = self._ray
        if deadline_s is None:
            deadline_s = self.step_deadline()
        pending = list(refs)
        start = time.monotonic()
        while pending:
            wait = None
            if deadline_s is not None:
                wait = max(start + deadline_s - time.monotonic(), 0.0)
            done, pending = ray.wait(pending, num_returns=1, timeout=wait)
            if not done:
                self._check_health(refs, time.monotonic() - start, deadline_s)
                start = time.monotonic()  # everyone answered: a slow step, not a stall
                continue
            try:
                ray.get(done[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                self.broken = True
                raise self._explain(refs, e) from None
        return ray.get(refs)

    def _explain(self, refs: list, first: Exception) -> Exception:
        """One error for a failed step: the rank whose actor died wins over survivors' errors."""
        ray = self._ray
        ray.wait(list(refs), num_returns=len(refs), timeout=SETTLE_S)
        rank = _dead_rank(ray, refs)
        if rank is not None:
            return WorkerDiedError(f"worker {self._where(rank)} died")
        stalled = self._silent_ranks()
        if stalled:
            return WorkerStalledError(
                f"worker {self._where(stalled[0])} stopped answering while the others failed "
                f"({_one_line(first)})"
            )
        cause = getattr(first, "cause", None)
        if isinstance(cause, TilerunError):
            return cause
        failed = next((r for r, ref in enumerate(refs) if _failed(ray, ref)), None)
        return WorkerFailedError(f"worker {self._where(failed)} failed: {_one_line(first)}")

    def _check_health(self, refs: list, waited: float, deadline_s: float | None) -> None:
        silent = self._silent_ranks()
        rank = _dead_rank(self._ray, refs)
        if rank is not None:
            self.broken = True
            raise WorkerDiedError(f"worker {self._where(rank)} died")
        if self._channel is not None and not silent:
            # a channel (graph or pipes) gives a step's results all at once: a rank whose step
            # raised while the others wait for it in a collective is found by asking
            failed = self._failed_ranks()
            if failed:
                self.broken = True
                r, why = failed[0]
                raise WorkerFailedError(f"worker {self._where(r)} failed: {why}")
        if silent:
            self.broken = True
            raise WorkerStalledError(
                f"worker {self._where(silent[0])} stopped answering: the step has run "
                f"{waited:.1f} s, past its deadline of {deadline_s:.1f} s, and the rank did not "
                f"answer two health checks ({3 * PING_TIMEOUT_S:.0f} s); the group is torn down "
                "(raise the deadline with step_timeout_s if steps are this slow)"
            )
        log.warning("a step has run %.1f s; every rank answers, still waiting", waited)

    def check_alive(self) -> None:
        """While no step runs (the service idles): raise ``WorkerDiedError`` naming a rank whose
        actor has died, or ``WorkerStalledError`` naming one that does not answer (stopped, or
        stuck), so the workers are rebuilt before the next task rather than at its first step (a
        death is otherwise only seen by a step, a stall only past a step's deadline). One ping
        per rank, on the actors' health group; a dead actor's fails at once, and a rank silent
        for ``PING_TIMEOUT_S`` is asked twice more, as a running step's ranks are."""
        ray = self._ray
        pings = [w.ping.remote() for w in self.workers]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=PING_TIMEOUT_S)
        rank = _dead_rank(ray, pings)
        if rank is not None:
            self.broken = True
            raise WorkerDiedError(f"worker {self._where(rank)} died")
        if len(ready) < len(pings):
            silent = self._silent_ranks()
            if silent:
                self.broken = True
                raise WorkerStalledError(
                    f"worker {self._where(silent[0])} stopped answering while idle: three "
                    f"health checks went unanswered ({4 * PING_TIMEOUT_S:.0f} s); the group is "
                    "torn down"
                )

    def _failed_ranks(self) -> list[tuple[int, str]]:
        ray = self._ray
        refs = [w.failed_step.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PING_TIMEOUT_S)
        out = []
        for rank, ref in enumerate(refs):
            if ref in ready:
                with contextlib.suppress(Exception):
                    why = ray.get(ref)
                    if why:
                        out.append((rank, why))
        return out

    def _silent_ranks(self) -> list[int]:
        """Ranks whose health check (a call beside the running step) gets no answer in time."""
        ray = self._ray
        ranks = list(range(len(self.workers)))
        for timeout in (PING_TIMEOUT_S, 2 * PING_TIMEOUT_S):
            pings = [self.workers[r].ping.remote() for r in ranks]
            ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout)
            answered = set(ready)
            silent = []
            for rank, ref in zip(ranks, pings):
                if ref not in answered:
                    silent.append(rank)
                    continue
                try:
                    ray.get(ref)
                except Exception:  # noqa: BLE001 - a dead actor does not answer either
                    silent.append(rank)
            if not silent:
                return []
            ranks = silent
        return silent

    def _where(self, rank: int | None) -> str:
        if rank is not None and rank < len(self.device_names):
            return f"rank {rank} on {self.device_names[rank]}"
        return f"rank {rank}"

    def step_deadline(self) -> float:
        """Seconds a step may run before the ranks are health-checked: a multiple of the slowest
        step so far, never under the floor; ``step_timeout_s`` sets it outright. Passing it
        only triggers the check: a rank that answers is busy, not stalled, and the step goes on."""
        if self.step_timeout_s:
            return float(self.step_timeout_s)
        if not self._ready:
            return BRING_UP_DEADLINE_S
        return max(STEP_FLOOR_S, STEP_DEADLINE_FACTOR * self._slowest_s)

    @property
    def max_in_flight(self) -> int:
        """Steps that may be submitted before the oldest one's result is taken."""
        return max(2, self.pipeline_depth + 1)

    def submit(self, batch: ScheduledBatch, logits: str = "none", hold: bool = False) -> StepHandle:
        if self.broken:
            raise self._error or WorkerFailedError("the worker group is broken; start a new one")
        while len(self._pending) >= self.max_in_flight:
            self._resolve(self._pending[0])
        packet = self._message(batch, logits)
        ticket = None
        if self._channel is not None:
            # held: the workers keep the newest ``pipeline_depth`` steps queued behind this one
            held = self.pipeline_depth if hold and self.hold_steps else 0
            self._send_step(packet + (min(held, MAX_DEPTH),))
        else:  # one actor call per worker per step; each actor runs its calls in order
            ticket = [w.step.remote(packet) for w in self.workers]
        handle = StepHandle(self, ticket)
        self._pending.append(handle)
        return handle

    def _send_step(self, packet: tuple) -> None:
        try:
            self._tickets.append(self._channel.send(packet))
        except Exception as e:  # noqa: BLE001 - a full channel: some rank stopped reading
            self._fail(self._explain_channel(e))
            raise self._error from None

    def _resolve(self, handle: StepHandle) -> None:
        while not handle.done():
            if not self._pending:  # broken before this handle was collected
                handle._set(None, self._error)
                return
            try:
                if self._channel is not None:
                    flush = not self._tickets
                    if flush:  # the workers hold every step sent: flush them
                        self.flushes += 1
                        self._send_step((None, "none", 0))
                    # taken off only once collected: an interrupt (Ctrl-C) during the wait
                    # leaves it for the next caller (the loop's abandon), not lost
                    results = self._wait_step(self._tickets[0])
                    self._tickets.popleft()
                    if flush and not results:
                        raise WorkerFailedError(
                            "a flush of the workers' held steps brought none back; "
                            f"{len(self._pending)} step(s) lost"
                        )
                else:
                    results = [
                        self._get(self._pending[0].ticket, deadline_s=self.step_deadline())[0]
                    ]
            except Exception as e:
                self._fail(e)
                continue
            for result in results:
                h = self._pending.popleft()
                start = max(h.submitted, self._last_done)
                h._set(result)
                self._last_done = time.monotonic()
                if self._steps:
                    self._slowest_s = max(self._slowest_s, self._last_done - start)
                self._steps += 1

    def _fail(self, error: BaseException) -> None:
        """The group is broken: every pending step fails with ``error``, and so does any later."""
        self.broken = True
        self._error = error
        for h in self._pending:
            h._set(None, error)
        self._pending.clear()
        self._tickets.clear()

    def _wait_step(self, ticket) -> list[StepResult]:
        """Rank 0's results of one step sent through the channel (the steps it returned, see
        ``Worker.advance``), with the deadline and health check of ``_get``; a dead rank wakes
        the wait at once (the graph's watcher; the pipes' end of file)."""
        loops = self._channel.loops
        deadline_s = self.step_deadline()
        start = time.monotonic()
        while not ticket.wait(max(start + deadline_s - time.monotonic(), 0.0)):
            self._check_health(loops, time.monotonic() - start, deadline_s)
            start = time.monotonic()
        if ticket.fatal is not None:
            raise self._explain_channel(ticket.fatal)
        failed = [(r, e) for r, (ok, e) in enumerate(ticket.outcome) if not ok]
        if failed:
            rank, first = failed[0]
            cause = getattr(first, "cause", None)
            if isinstance(cause, TilerunError):
                return_error: Exception = cause
            else:
                return_error = WorkerFailedError(
                    f"worker {self._where(rank)} failed: {_one_line(first)}"
                )
            raise return_error
        return ticket.outcome[0][1]

    def _explain_channel(self, first: BaseException) -> Exception:
        """The channel (graph or pipes) broke: name the rank whose actor died, else one that
        stopped."""
        ray = self._ray
        loops = self._channel.loops
        ray.wait(loops, num_returns=1, timeout=SETTLE_S)  # a death reaches its loop's ref
        rank = _dead_rank(ray, loops)
        if rank is not None:
            return WorkerDiedError(f"worker {self._where(rank)} died")
        stalled = self._silent_ranks()
        if stalled:
            return WorkerStalledError(f"worker {self._where(stalled[0])} stopped answering")
        return WorkerFailedError(f"the workers' step graph failed: {_one_line(first)}")

    def shutdown(self) -> None:
        ray = self._ray
        from ray.util.placement_group import remove_placement_group

        workers = getattr(self, "workers", [])
        channel = getattr(self, "_channel", None)
        # a step still in flight (an interrupted run) may never end: treated as a broken group
        if getattr(self, "_pending", None):
            self.broken = True
        if channel is not None and not self.broken:
            channel.close(broken=False)  # the loops exit; the actors stay for the calls below
        if workers and not getattr(self, "broken", False):
            # best effort, all ranks at once and bounded: the kill below is what frees the actor
            with contextlib.suppress(Exception):
                ray.wait([w.shutdown.remote() for w in workers], num_returns=len(workers),
                         timeout=SHUTDOWN_S)  # fmt: skip
        for w in workers:
            with contextlib.suppress(Exception):
                ray.kill(w, no_restart=True)
        if channel is not None and self.broken:
            channel.close(broken=True)  # the actors are gone: nothing is left to wait for
        self._channel = None
        self.workers = []
        if getattr(self, "pg", None) is not None:
            remove_placement_group(self.pg)
            self.pg = None


def step_transport(
    setting: str,
    device_type: str,
    tp: int = 1,
    long_lived: bool = False,
    comm: str = "gloo",
    on_driver_node: bool = False,
) -> str:
    """``pipe``, ``compiled`` or ``calls`` for the ``step_transport`` setting (``auto``: as
    measured).

    Accelerator ranks on the driver's node take the pipes (``cluster.pipe_steps``): a round
    trip of 29-32 us against 115 us through a compiled graph on the H200, and the demo model's
    decode step through one worker 0.215 ms against 0.256 in process with the pipes' early reply
    (``step-transports-nvidia-h200-2026-12-04.log``). Elsewhere accelerators take the graph.

    On CPU devices a graph's ranks wait for their next step by spinning (Ray's channel reader)
    on the cores they compute on, where the pipes' ranks sleep. Measured on an idle 2-core CPU
    with the demo model: one worker's decode step 3.51 / 5.05 ms through the graph against 3.99 /
    5.72 through the pipes in two runs (``step-demo-small-cpu-pipe{,-2}.json``; rank 0's own
    step ~0.4 ms slower and the time outside it 0.31-0.59 against 0.23-0.35 ms: cause not
    found), 4.41 as calls; an 8K-token prefill through ``tilerun run`` 4,148 / 4,081 tokens/s
    through the pipes, 4,090 / 3,153 as calls, 3,834 / 3,000 through the graph
    (``step-transport-cpu-pipe-prefill.log``); two workers over gloo 22.9 ms through the pipes
    against 24.5 as calls (``step-demo-small-cpu-tp2-gloo.json``), over MPI 3.72 through the
    graph against 5.35 as calls (their MPI waits poll anyway). So on
    CPU ``auto`` is the graph for one worker and for MPI groups, and the pipes (ranks on the
    driver's node) or calls (elsewhere) for gloo groups and for a ``long_lived`` engine (the
    service), whose idle ranks would otherwise each keep a core spinning between tasks."""
    if setting != "auto":
        return setting
    if device_type != "cpu":
        return "pipe" if on_driver_node else "compiled"
    if (tp == 1 or comm == "mpi") and not long_lived:
        return "compiled"
    return "pipe" if on_driver_node else "calls"


def _on_driver_node(ray, pg) -> bool:
    """Every bundle of ``pg`` is on the node this driver runs on (its ranks can share FIFOs)."""
    from ray.util import placement_group_table

    here = ray.get_runtime_context().get_node_id()
    where = placement_group_table(pg).get("bundles_to_node_id", {})
    return len(where) == len(pg.bundle_specs) and all(n == here for n in where.values())


def _rendezvous_host(ray, pg, first_bundle: int) -> str:
    """Where rank 0 listens for the group: loopback when every rank is on one node, else the
    address Ray uses for rank 0's node. Never all interfaces."""
    from ray.util import placement_group_table

    where = placement_group_table(pg).get("bundles_to_node_id", {})
    if len(set(where.values())) <= 1:
        return "127.0.0.1"
    node = where.get(first_bundle)
    for n in ray.nodes():
        if n.get("NodeID") == node:
            return n["NodeManagerAddress"]
    raise RuntimeError(f"rank 0's node {node} is not among the cluster's nodes")


def _failed(ray, ref) -> bool:
    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.GetTimeoutError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


def _one_line(e: BaseException) -> str:
    """The last line of an error's own message (Ray wraps the remote traceback around it)."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, RankError):  # a rank's error, already in these words
        return str(cause)
    text = str(cause).strip().splitlines()
    last = text[-1] if text else ""
    return f"{type(cause).__name__}: {last}" if last else type(cause).__name__


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
