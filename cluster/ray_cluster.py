"""Starting or attaching to a Ray cluster, the only place tilerun calls ``ray.init``.

The embedded local cluster binds its dashboard to 127.0.0.1 and keeps Ray's token
authentication as Ray sets it up; attaching to an existing cluster takes its address.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def ensure_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    dashboard: bool | None = None,
    dashboard_host: str | None = None,
) -> dict:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start an embedded local cluster.

    Returns a small description (address, dashboard URL). Idempotent within a process.
    ``dashboard=None`` follows ``TILERUN_DASHBOARD`` (default on; ``0`` where the dashboard's
    packages are not installed). The dashboard binds to ``dashboard_host``, else
    ``TILERUN_DASHBOARD_HOST``, else 127.0.0.1: it is reachable from other hosts only when the
    user says so (Ray's token authentication guards it either way).
    """
    global _dashboard_url
    if ray.is_initialized():
        return describe()
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    if dashboard is None:
        dashboard = os.environ.get("TILERUN_DASHBOARD", "1") != "0"
    if dashboard_host is None:
        dashboard_host = os.environ.get("TILERUN_DASHBOARD_HOST", "127.0.0.1")
    if address:
        ctx = ray.init(address=address, **kwargs)
    else:
        # Logical CPUs: at least enough for a small TP group of CPU workers on a 2-core box.
        ncpu = num_cpus if num_cpus is not None else max(os.cpu_count() or 1, 4)
        ctx = ray.init(
            num_cpus=ncpu,
            include_dashboard=dashboard,
            dashboard_host=dashboard_host,
            **kwargs,
        )
    _dashboard_url = getattr(ctx, "dashboard_url", None) or None
    return describe()


_dashboard_url: str | None = None


def describe() -> dict:
    ctx = ray.get_runtime_context()
    info = {"address": ctx.gcs_address, "resources": ray.cluster_resources()}
    url = _dashboard_url
    if url:
        info["dashboard"] = url if url.startswith("http") else f"http://{url}"
    return info


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
