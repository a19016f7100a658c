"""Shared fixtures: one real local Ray cluster per test session (started on first use)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before the first
# `import triton` of the session, so it is set here, before any test module is imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


SHM = Path("/dev/shm")


def _mapped_or_open_shm() -> set[str]:
    """Paths under /dev/shm that a live process maps or holds open (those we can see)."""
    out: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                out.update(line.split(None, 5)[-1].strip() for line in f if "/dev/shm/" in line)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    out.add(target)
        except OSError:
            continue
    return out


@pytest.fixture(scope="session", autouse=True)
def no_leftover_mpich_segments():
    """MPICH's shared-memory segments outlive MPI processes that end without finalizing (ranks
    killed on purpose, Ray actors at shutdown): about 60 a run. A machine that runs the suite
    many times fills /dev/shm, and MPI init then fails with "Out of memory". At the end of the
    session, remove the segments it made that no live process maps or holds open."""
    before = set(SHM.glob("mpich_shm_*")) if SHM.is_dir() else set()
    yield
    if not SHM.is_dir():
        return
    new = set(SHM.glob("mpich_shm_*")) - before
    if not new:
        return
    time.sleep(0.5)  # ranks still exiting let go of theirs
    in_use = _mapped_or_open_shm()
    for p in new - {Path(x) for x in in_use}:
        p.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real embedded Ray cluster (4 logical CPUs, no dashboard to keep start-up short)."""
    import ray

    from cluster.ray_cluster import ensure_ray, shutdown_ray

    if not ray.is_initialized():
        ensure_ray(num_cpus=4, dashboard=False)
    yield ray
    shutdown_ray()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """A small GQA Llama checkpoint written by transformers, and the HF model itself."""
    from tests.hf_models import make_hf_llama

    d = tmp_path_factory.mktemp("hf_gqa")
    return d, make_hf_llama(d, "gqa")
