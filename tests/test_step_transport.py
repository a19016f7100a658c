"""How each step reaches the Ray workers (``step_transport``): pipes, a compiled graph and plain
calls give the in-process tokens at TP = 1 and 2 (gloo, MPI); several steps may be in flight and
come back in order; a dead rank is named at once, a stopped one by the health check and a failed
step with its rank, whichever transport carries the steps."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from cluster.api import LLM
from cluster.config import EngineConfig
from cluster.executor import (
    WorkerDiedError,
    WorkerFailedError,
    WorkerStalledError,
    comm_backend,
    mpi_available,
    step_transport,
)
from scheduler.batch import ScheduledBatch, SeqChunk
from scheduler.errors import ConfigError
from scheduler.request import SamplingParams

PROMPTS = [list(range(1, 60)), [5, 6, 7]]


def _cfg(path, **kw):
    return dict(model=str(path), device="cpu", dtype="float32", max_model_len=512, **kw)


def test_setting_is_checked_and_auto_picks_by_device():
    assert (
        EngineConfig.from_dict({"step_transport": "compiled"}).cluster.step_transport == "compiled"
    )
    with pytest.raises(ConfigError, match="step_transport"):
        EngineConfig.from_dict({"step_transport": "graph"})
    # every rank on the driver's node: the pipes on accelerators, for gloo groups and the service
    for args in [
        ("cuda",),
        ("cuda", 4, True),
        ("cpu", 2),
        ("cpu", 1, True),
        ("cpu", 2, True, "mpi"),
    ]:
        assert step_transport("auto", *args, on_driver_node=True) == "pipe"
    # one CPU worker, CPU ranks over MPI: the graph (measured faster there)
    assert step_transport("auto", "cpu", on_driver_node=True) == "compiled"
    assert step_transport("auto", "cpu", 2, comm="mpi", on_driver_node=True) == "compiled"
    assert step_transport("compiled", "cuda", on_driver_node=True) == "compiled"  # asked for
    # a rank elsewhere
    assert step_transport("auto", "cpu") == "compiled"  # one CPU worker
    assert step_transport("auto", "cpu", tp=2) == "calls"  # over gloo
    assert step_transport("auto", "cpu", tp=2, comm="mpi") == "compiled"
    assert step_transport("auto", "cpu", tp=2, long_lived=True, comm="mpi") == "calls"
    assert step_transport("auto", "cpu", long_lived=True) == "calls"  # the service
    assert step_transport("auto", "cuda", tp=4, long_lived=True) == "compiled"
    assert step_transport("auto", "cuda") == "compiled"
    assert step_transport("calls", "cuda") == "calls"


@pytest.fixture(scope="module")
def local_tokens(hf_checkpoint):
    path, _ = hf_checkpoint
    with LLM(executor="local", **_cfg(path, prefill_chunk=32)) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_new_tokens=10))]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    "tp,comm,transport,held",
    [(1, "gloo", "pipe", False), (1, "gloo", "compiled", False), (1, "gloo", "calls", False),
     (2, "gloo", "pipe", False), (2, "gloo", "pipe", 1), (2, "gloo", "pipe", 3),
     (2, "gloo", "compiled", False), (2, "gloo", "compiled", 1),
     (2, "gloo", "compiled", 3), (2, "mpi", "compiled", False), (2, "mpi", "pipe", False)],
)  # fmt: skip
def test_transports_give_the_in_process_tokens(
    ray_cluster, hf_checkpoint, local_tokens, tp, comm, transport, held
):
    """``held`` = d: the workers return each step d executions later (the default on
    accelerators), with d steps in flight, the overlapped loop's late stops and the flush at
    the end of a run."""
    path, _ = hf_checkpoint
    cfg = _cfg(path, prefill_chunk=32, tp=tp, comm=comm, step_transport=transport)
    with LLM(executor="ray", **cfg) as llm:
        assert llm.engine.executor.step_transport == transport
        assert f"steps via {transport}" in llm.ready_line  # what auto chose is said at start
        ex = llm.engine.executor
        # where time to ready went, phase by phase (scripts/time_to_ready.py prints it)
        phases = ["ray_start", "placement_group", "init_device"]
        phases += ["init_communicator"] * (tp > 1) + ["load_model", "init_kv_cache", "warm_up"]
        phases += {"compiled": ["compile_graph"], "pipe": ["open_pipes"]}.get(transport, [])
        assert list(ex.bring_up_s) == phases and all(v >= 0 for v in ex.bring_up_s.values())
        ex.hold_steps, ex.pipeline_depth = bool(held), max(1, int(held))
        got = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_new_tokens=10))]
        assert (getattr(ex, "flushes", 0) > 0) == bool(held)
    assert got == local_tokens


def test_auto_comm_on_cpu_is_mpi_for_several_ranks_on_one_node(monkeypatch):
    import cluster.executor

    assert mpi_available()  # the test environment installs mpi4py and the mpich wheel
    cores = os.cpu_count() or 1
    assert comm_backend("auto", "cpu", tp=2, one_node=True) == ("mpi" if cores >= 2 else "gloo")
    assert comm_backend("auto", "cpu", tp=2, one_node=False) == "gloo"  # across nodes
    assert comm_backend("auto", "cpu", tp=cores + 1, one_node=True) == "gloo"  # oversubscribed
    assert comm_backend("auto", "cpu", tp=1, one_node=True) == "gloo"
    assert comm_backend("gloo", "cpu", tp=2, one_node=True) == "gloo"  # asked for
    assert comm_backend("auto", "cuda", tp=2, one_node=True) == "nccl"
    monkeypatch.setattr(cluster.executor, "mpi_available", lambda: False)
    assert comm_backend("auto", "cpu", tp=2, one_node=True) == "gloo"


@pytest.mark.ray
@pytest.mark.slow
def test_auto_on_two_cpu_ranks_runs_mpi_through_the_graph(ray_cluster, hf_checkpoint, local_tokens):
    """TP=2 with every setting on auto: MPI between the ranks and the compiled graph to them (2
    cores here), gloo and the pipes where one core only; the in-process tokens."""
    path, _ = hf_checkpoint
    with LLM(executor="ray", **_cfg(path, prefill_chunk=32, tp=2)) as llm:
        ex = llm.engine.executor
        mpi = (os.cpu_count() or 1) >= 2  # never more MPI ranks than cores
        assert (ex.comm, ex.step_transport) == (("mpi", "compiled") if mpi else ("gloo", "pipe"))
        got = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_new_tokens=10))]
    assert got == local_tokens


def _prefill(seq_id: int, prompt: list[int], first_block: int, step: int) -> ScheduledBatch:
    blocks = tuple(range(first_block, first_block + -(-len(prompt) // 16)))
    chunk = SeqChunk(seq_id, tuple(prompt), 0, blocks, True, SamplingParams(max_new_tokens=4))
    return ScheduledBatch(step, (chunk,))


def _three_batches() -> list[ScheduledBatch]:
    return [_prefill(100 + i, list(range(3 + i, 40 + 5 * i)), 1 + 4 * i, i + 1) for i in range(3)]


def test_worker_advance_returns_held_steps_in_order(hf_checkpoint):
    """``Worker.advance`` with ``hold`` returns each step's result with the next call (a flush,
    ``advance(None)``, returns the last), without it at once: the same results either way."""
    path, _ = hf_checkpoint
    batches = _three_batches()
    with LLM(executor="local", **_cfg(path)) as llm:
        want = [llm.engine.executor.execute(b, "sampled") for b in batches]
    with LLM(executor="local", **_cfg(path)) as llm:
        w = llm.engine.executor.worker
        assert w.advance(batches[0], "sampled", True) == []
        got = w.advance(batches[1], "sampled", True)
        got += w.advance(batches[2], "sampled", False)  # not held: its own result comes too
        assert w.advance(None) == []
        # two held: each result comes two calls later, the flush brings the last two
        assert w.advance(batches[0], "sampled", 2) == w.advance(batches[1], "sampled", 2) == []
        late = w.advance(batches[2], "sampled", 2) + w.advance(None)
    assert [g.sampled for g in late] == [x.sampled for x in want]
    assert [g.sampled for g in got] == [x.sampled for x in want]
    for g, x in zip(got, want):
        for sid in x.logits:
            assert (g.logits[sid] - x.logits[sid]).abs().max() < 1e-4


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("transport,hold", [("pipe", False), ("pipe", True), ("compiled", False),
                                            ("compiled", True), ("calls", False)])  # fmt: skip
def test_steps_in_flight_come_back_in_order(ray_cluster, hf_checkpoint, transport, hold):
    """Three steps submitted before any result is taken (two may be in flight; the third
    submit resolves the oldest): each handle holds its own step's result, asked in any order,
    equal to the same steps run one at a time in process. With ``hold`` the graph returns each
    step with the next execution, and a flush brings the last."""
    path, _ = hf_checkpoint
    batches = _three_batches()
    with LLM(executor="local", **_cfg(path)) as llm:
        want = [llm.engine.executor.execute(b, "sampled") for b in batches]
    with LLM(executor="ray", **_cfg(path, tp=2, step_transport=transport)) as llm:
        ex = llm.engine.executor
        assert ex.max_in_flight >= 2
        ex.hold_steps = hold  # on by default on accelerators only
        handles = [ex.submit(b, "sampled", hold=hold) for b in batches]
        got = [h.result() for h in reversed(handles)][::-1]
        assert all(h.done() for h in handles) and handles[0].result() is got[0]
        # held: each execution brought the step before it back, the last came by a flush
        assert getattr(ex, "flushes", 0) == (1 if hold else 0)
        assert ex.execute(batches[0], "sampled").sampled == want[0].sampled  # still usable
    for g, w in zip(got, want):
        assert g.sampled == w.sampled
        for sid in w.logits:
            assert (g.logits[sid] - w.logits[sid]).abs().max() < 1e-4


def _pids(llm) -> list[int]:
    import ray

    return ray.get([w.pid.remote() for w in llm.engine.executor.workers])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("transport,rank", [("compiled", 0), ("compiled", 1), ("pipe", 0),
                                            ("pipe", 1)])  # fmt: skip
def test_dead_rank_is_named_at_once(ray_cluster, hf_checkpoint, transport, rank):
    path, _ = hf_checkpoint
    llm = LLM(executor="ray", **_cfg(path, tp=2, step_transport=transport))
    try:
        llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))  # the graph runs
        os.kill(_pids(llm)[rank], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match=rf"worker rank {rank} on cpu .* died"):
            llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=8))
        assert time.monotonic() - t0 < 15
    finally:
        t1 = time.monotonic()
        llm.shutdown()
    assert time.monotonic() - t1 < 30, "shutting down a broken group took too long"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["compiled", "pipe"])
def test_stalled_rank_is_named_by_the_health_check(ray_cluster, hf_checkpoint, transport):
    path, _ = hf_checkpoint
    llm = LLM(executor="ray", **_cfg(path, tp=2, step_transport=transport))
    pids = _pids(llm)
    try:
        os.kill(pids[1], signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(WorkerStalledError, match=r"worker rank 1 on cpu .* stopped answering"):
            llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=8))
        assert time.monotonic() - t0 < 30
    finally:
        llm.shutdown()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("transport,hold", [("compiled", False), ("compiled", True),
                                            ("pipe", False), ("pipe", True)])  # fmt: skip
def test_a_failed_step_is_named_with_its_rank(ray_cluster, hf_checkpoint, transport, hold):
    """A step that raises on the ranks (here: block numbers past the cache) is reported with the
    rank and the error's own words, and breaks the group for later steps. Held, the pipes have
    replied before the launch fails: the error comes with the next reply (the flush)."""
    path, _ = hf_checkpoint
    with LLM(executor="ray", **_cfg(path, tp=2, step_transport=transport)) as llm:
        ex = llm.engine.executor
        ex.hold_steps = hold
        bad = _prefill(7, list(range(1, 40)), 10**7, 1)
        with pytest.raises(WorkerFailedError, match=r"worker rank 0 on cpu .* failed: \w+Error"):
            ex.submit(bad, "sampled", hold=hold).result()
        assert ex.broken


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.ray
@pytest.mark.slow
def test_idle_pipe_ranks_sleep(ray_cluster, hf_checkpoint):
    """Between steps a rank on the pipes waits in ``read``, asleep: an idle engine (the
    service's, between tasks) keeps no core busy, where a graph's ranks spin."""
    path, _ = hf_checkpoint
    with LLM(executor="ray", **_cfg(path, tp=2, step_transport="pipe")) as llm:
        llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))
        pids = _pids(llm)
        before = [_cpu_seconds(p) for p in pids]
        time.sleep(2.0)
        used = [_cpu_seconds(p) - b for p, b in zip(pids, before)]
    assert max(used) < 0.2, f"idle ranks used {used} s of CPU in 2 s"


@pytest.mark.ray
@pytest.mark.slow
def test_cpu_collector_sleeps_while_the_ranks_compute(ray_cluster):
    """On CPU the driver waits for a step's results asleep (each rank writes a byte to a FIFO
    when its step is done), not spinning on the graph's channel on a core the ranks compute
    on: the collector thread's CPU time stays a small part of the run's wall time."""
    cfg = dict(model="demo-small", device="cpu", dtype="float32", max_model_len=4096)
    with LLM(executor="ray", step_transport="compiled", prefill_chunk=512, **cfg) as llm:
        assert llm.engine.executor._channel._wake_fd is not None
        collector = next(t for t in threading.enumerate() if t.name == "tilerun-steps-collector")
        clock = time.pthread_getcpuclockid(collector.ident)
        cpu0, wall0 = time.clock_gettime(clock), time.monotonic()
        prompt = [i % 500 + 1 for i in range(3000)]  # six prefill steps of ~0.1 s or more
        out = llm.generate([prompt], SamplingParams(max_new_tokens=8))[0]
        cpu, wall = time.clock_gettime(clock) - cpu0, time.monotonic() - wall0
    assert len(out.token_ids) == 8
    assert cpu < 0.1 * wall, f"collector used {cpu:.2f} s of CPU in {wall:.2f} s"


@pytest.mark.ray
@pytest.mark.slow
def test_auto_falls_back_to_calls_when_no_graph_compiles(ray_cluster, hf_checkpoint, monkeypatch):
    import cluster.compiled_steps
    import cluster.executor

    def broken(self, workers, max_in_flight, wake=False):
        raise RuntimeError("no shared-memory channels here")

    path, _ = hf_checkpoint
    monkeypatch.setattr(cluster.executor, "step_transport", lambda *a: "compiled")
    monkeypatch.setattr(cluster.compiled_steps.CompiledSteps, "__init__", broken)
    with LLM(executor="ray", **_cfg(path, step_transport="auto")) as llm:
        assert llm.engine.executor.step_transport == "calls"
        assert len(llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0].token_ids) == 2
    with pytest.raises(RuntimeError, match="no shared-memory channels"):
        LLM(executor="ray", **_cfg(path, step_transport="compiled"))


@pytest.mark.ray
@pytest.mark.slow
def test_pipes_need_the_driver_node_and_auto_falls_back(ray_cluster, hf_checkpoint, monkeypatch):
    """``pipe`` asked for where a rank is on another node: one line naming the setting and the
    fix. ``auto`` whose pipes fail to open takes plain calls, and says so."""
    import cluster.executor
    import cluster.pipe_steps

    path, _ = hf_checkpoint
    with monkeypatch.context() as m:
        m.setattr(cluster.executor, "_on_driver_node", lambda ray, pg: False)
        with pytest.raises(ConfigError, match=r"step_transport=pipe .* Fix: step_transport=auto"):
            LLM(executor="ray", **_cfg(path, step_transport="pipe"))

    def broken(self, workers):
        raise OSError("no FIFOs here")

    monkeypatch.setattr(cluster.executor, "step_transport", lambda *a: "pipe")
    monkeypatch.setattr(cluster.pipe_steps.PipeSteps, "__init__", broken)
    with LLM(executor="ray", **_cfg(path, step_transport="auto")) as llm:
        assert llm.engine.executor.step_transport == "calls"
        assert len(llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0].token_ids) == 2


@pytest.mark.ray
@pytest.mark.slow
def test_pipes_that_fail_to_open_leave_no_rank_waiting(ray_cluster, hf_checkpoint, monkeypatch):
    """Bring-up of the pipes fails after rank 0's FIFO is open and before rank 1's: ``auto``
    takes plain calls, and both ranks' pipe loops end (rank 1's was waiting in ``open`` for a
    writer that never came; ``PipeSteps.close`` lets it go)."""
    import ray

    import cluster.executor
    import cluster.pipe_steps

    opened, loops = [], []
    open_writer = cluster.pipe_steps.PipeSteps._open_writer
    close = cluster.pipe_steps.PipeSteps.close

    def second_fails(self, path, loop):
        if opened:
            raise OSError("rank 1's FIFO cannot be opened")
        opened.append(path)
        return open_writer(self, path, loop)

    def keeping_loops(self, broken):
        loops.extend(self.loops)
        close(self, broken)

    path, _ = hf_checkpoint
    monkeypatch.setattr(cluster.executor, "step_transport", lambda *a: "pipe")
    monkeypatch.setattr(cluster.pipe_steps.PipeSteps, "_open_writer", second_fails)
    monkeypatch.setattr(cluster.pipe_steps.PipeSteps, "close", keeping_loops)
    with LLM(executor="ray", **_cfg(path, tp=2, step_transport="auto")) as llm:
        assert llm.engine.executor.step_transport == "calls"
        assert len(loops) == 2
        done, waiting = ray.wait(loops, num_returns=2, timeout=15)
        assert not waiting, "a rank's pipe loop is still waiting in open()"
        assert len(llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0].token_ids) == 2
