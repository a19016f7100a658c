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
    """The ``mpiexec`` beside this Python (a venv with the ``mpich`` wheel), else on ``PATH``."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec")
    if found:
        return found
    raise RuntimeError(
        f"no mpiexec beside {sys.executable} nor on PATH; the mpi backend needs one: "
        "pip install mpich mpi4py (into the environment that runs the workers)"
    )


def mpi_runtime_env(env_vars: dict[str, str] | None = None) -> dict:
    """``runtime_env`` for a Ray actor whose worker process runs under ``mpiexec -n 1``.

    ``env_vars`` (optional) are set in the worker; mpiexec passes the environment through.
    """
    env: dict = {"py_executable": f"{find_mpiexec()} -n 1 {sys.executable}"}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


__all__ = ["find_mpiexec", "mpi_runtime_env"]
