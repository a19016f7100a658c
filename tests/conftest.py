"""Shared fixtures: one real local Ray cluster per test session (started on first use)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before the first
# `import triton` of the session, so it is set here, before any test module is imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


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
