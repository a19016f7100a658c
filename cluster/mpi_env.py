"""The Ray ``runtime_env`` that starts an actor's worker process as its own ``mpiexec -n 1`` job.

MPI processes started without a launcher ("singletons") cannot connect to each other through
ports; each started by ``mpiexec -n 1`` can (see the MPI-among-Ray-actors notes). So every actor
that will join an MPI group is created with::

    Worker.options(runtime_env=mpi_runtime_env()).remote()

and the group is then formed through a port (``collectives.factory.open_rendezvous("mpi")``).
"""

from __future__ import annotations

import os
import shutil
import sys


def find_mpiexec() -> str:
    """The launcher beside this Python (a venv with the ``mpich`` wheel), else on ``PATH``.

    MPICH's ``mpiexec.gforker`` is preferred: it forks the one local process and talks to it
    over pipes, where Hydra's ``mpiexec`` listens on a control port on all interfaces (and
    leaves ``hydra_pmi_proxy`` behind when its process is stopped and killed).
    """
    for name in ("mpiexec.gforker", "mpiexec"):
        beside = os.path.join(os.path.dirname(sys.executable), name)
        if os.path.isfile(beside) and os.access(beside, os.X_OK):
            return beside
    for name in ("mpiexec.gforker", "mpiexec"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        f"no mpiexec beside {sys.executable} nor on PATH; the mpi backend needs one: "
        "pip install mpich mpi4py (into the environment that runs the workers)"
    )


def mpi_bind_env(host: str) -> dict[str, str]:
    """Environment that keeps MPI's own listening sockets (the endpoints behind
    ``MPI.Open_port``) on loopback when every rank is on one node (``host`` is loopback).

    The ``mpich`` wheel runs the ch4 device over UCX (its TCP transport listens on every
    interface UCX may use) or libfabric; each is told to use ``lo`` only. For a group across
    nodes, nothing is set: restrict the interface yourself (``UCX_NET_DEVICES=eth0``, or
    ``FI_TCP_IFACE``), see the README. A user's own setting wins.
    """
    if not host.startswith("127."):
        return {}
    want = {"UCX_NET_DEVICES": "lo", "FI_TCP_IFACE": "lo", "FI_SOCKETS_IFACE": "lo"}
    return {k: v for k, v in want.items() if not os.environ.get(k)}


def mpi_runtime_env(env_vars: dict[str, str] | None = None) -> dict:
    """``runtime_env`` for a Ray actor whose worker process runs under ``mpiexec -n 1``.

    ``env_vars`` (optional) are set in the worker; mpiexec passes the environment through.
    """
    env: dict = {"py_executable": f"{find_mpiexec()} -n 1 {sys.executable}"}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


__all__ = ["find_mpiexec", "mpi_bind_env", "mpi_runtime_env"]
