"""The mpi4py communicator, formed both ways it is used.

(a) ``mpiexec -n N python -m collectives.selfcheck``: the group is COMM_WORLD.
(b) Ray actors (on conftest's local cluster: ``ray.init(num_cpus=4, include_dashboard=False)``),
    each its worker process under ``mpiexec -n 1`` (``cluster.mpi_env``): rank 0 opens
    a port, the driver passes it through Ray, the ranks join concurrently (deliberately launched
    in reverse order) and the group must come out in the requested rank order.

Both run ``collectives.selfcheck`` on every rank (expected values computed locally).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mpi4py")

from cluster.mpi_env import find_mpiexec, mpi_runtime_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3])
def test_mpiexec_comm_world(world_size: int) -> None:
    cmd = [find_mpiexec(), "-n", str(world_size), sys.executable, "-m", "collectives.selfcheck"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    for rank in range(world_size):
        assert f"selfcheck ok rank {rank}/{world_size}" in proc.stdout, proc.stdout


def test_mpi_runtime_env_points_at_mpiexec() -> None:
    env = mpi_runtime_env({"A": "1"})
    launcher, n, one, python = env["py_executable"].split()
    assert os.access(launcher, os.X_OK) and (n, one) == ("-n", "1") and python == sys.executable
    assert env["env_vars"] == {"A": "1"}


@pytest.fixture(scope="module")
def mpi_actors(ray_cluster):
    """Three actors whose worker processes run under ``mpiexec -n 1``, on the session's local Ray
    cluster (conftest: 4 logical CPUs, no dashboard)."""
    ray = ray_cluster
    from collectives.selfcheck import SelfCheckWorker

    # num_cpus=0: on 2 cores the actors only wait on each other, they must not wait for a CPU slot
    worker_cls = ray.remote(num_cpus=0)(SelfCheckWorker)
    env = mpi_runtime_env({"PYTHONPATH": _env()["PYTHONPATH"]})
    actors = [worker_cls.options(runtime_env=env).remote() for _ in range(3)]
    try:
        pids = ray.get([a.pid.remote() for a in actors], timeout=90)
        yield ray, actors
    finally:
        for a in actors:
            ray.kill(a)
    # the Python under each mpiexec must not outlive its actor
    deadline = time.monotonic() + 20
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.2)
    assert not alive, f"actor processes {alive} outlived ray.kill()"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; it only waits for its parent to reap it
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(110)
@pytest.mark.parametrize("world_size", [2, 3])
def test_mpi_among_ray_actors(mpi_actors, world_size: int) -> None:
    ray, actors = mpi_actors
    group = actors[:world_size]
    info = ray.get(group[0].open_rendezvous.remote("mpi", world_size), timeout=30)
    assert info["mode"] == "port" and len(info["port_names"]) == world_size - 1
    # join in reverse order: the connects arrive in an order unlike the ranks
    joins = {
        rank: a.join.remote("mpi", rank, world_size, info)
        for rank, a in reversed(list(enumerate(group)))
    }
    assert ray.get([joins[r] for r in range(world_size)], timeout=60) == list(range(world_size))
    try:
        results = ray.get([a.run.remote() for a in group], timeout=60)
        assert all("linear_all_reduce" in r and "barrier" in r for r in results), results
    finally:
        ray.get([a.leave.remote() for a in group], timeout=30)
