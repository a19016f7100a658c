"""Faults in a running TP group (#9) and what a group exposes to the network: a stalled rank is
named within seconds and the group torn down, a dead rank 0 is reported as rank 0, and nothing
the group opens listens beyond loopback when every rank is on this host."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from cluster.api import LLM
from cluster.executor import RayExecutor, WorkerDiedError, WorkerStalledError
from scheduler.request import SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.slow]

COMMS = ["gloo", "mpi"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().split(") ", 1)[1].split()[1])


def _worker_pids(llm: LLM) -> list[int]:
    import ray

    return ray.get([w.pid.remote() for w in llm.engine.executor.workers])


def _launchers(pids: list[int]) -> list[int]:
    """The mpiexec processes above MPI workers (none for gloo workers)."""
    out = []
    for pid in pids:
        parent = _parent(pid)
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            if b"mpiexec" in f.read():
                out.append(parent)
    return out


def _listening(pids: set[int]) -> set[tuple[str, str]]:
    """(local address, port) of TCP sockets listening in processes ``pids``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        if not any(f"pid={p}," in line for p in pids):
            continue
        addr, _, port = line.split()[3].rpartition(":")
        found.add((addr, port))
    return found


def _llm(path, comm: str) -> LLM:
    return LLM(executor="ray", model=str(path), device="cpu", dtype="float32", tp=2, comm=comm)


@pytest.mark.parametrize("comm", COMMS)
def test_group_listens_on_loopback_only(ray_cluster, hf_checkpoint, monkeypatch, comm):
    """Sockets the group opens (rendezvous store, gloo pairs, MPI ports) are on 127.0.0.1; the
    Ray worker's own sockets, open before the group forms, are Ray's business."""
    before: dict[str, set] = {}
    real_all = RayExecutor._all

    def spy(self, method, *args):
        result = real_all(self, method, *args)
        if method == "init_device":
            import ray

            pids = ray.get([w.pid.remote() for w in self.workers])
            before["pids"] = set(pids) | set(_launchers(pids))
            before["sockets"] = _listening(before["pids"])
        return result

    monkeypatch.setattr(RayExecutor, "_all", spy)
    path, _ = hf_checkpoint
    llm = _llm(path, comm)
    try:
        assert llm.engine.executor.rendezvous_host == "127.0.0.1"
        new = _listening(before["pids"]) - before["sockets"]
        out = llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0]
        assert len(out.token_ids) == 2
    finally:
        llm.shutdown()
    if comm == "gloo":
        assert new, "the rendezvous store should be listening while the group lives"
    wide = [a for a in new if a[0] not in ("127.0.0.1", "[::1]")]
    assert not wide, f"{comm} group listens beyond loopback: {wide}"


@pytest.mark.parametrize("comm", COMMS)
def test_stalled_rank_is_named_within_seconds(ray_cluster, hf_checkpoint, comm):
    path, _ = hf_checkpoint
    llm = _llm(path, comm)
    pids = _worker_pids(llm)
    ours = pids + _launchers(pids)
    try:
        os.kill(pids[1], signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(WorkerStalledError, match=r"worker rank 1 on cpu .* stopped answering"):
            llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=8))
        took = time.monotonic() - t0
    finally:
        llm.shutdown()
    assert took < 30, f"the stall was named after {took:.1f} s"
    left = _gone_within(ours, 30)
    assert not left, f"processes left behind: {left}"


@pytest.mark.parametrize("rank", [0, 1])
def test_dead_rank_is_named_whichever_it_is(ray_cluster, hf_checkpoint, rank):
    path, _ = hf_checkpoint
    llm = _llm(path, "gloo")
    pids = _worker_pids(llm)
    try:
        os.kill(pids[rank], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match=rf"worker rank {rank} on cpu .* died"):
            llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=8))
        assert time.monotonic() - t0 < 20
    finally:
        llm.shutdown()
    assert not _gone_within(pids, 30)
