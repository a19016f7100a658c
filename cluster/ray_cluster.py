"""Starting or attaching to a Ray cluster, the only place tilerun calls ``ray.init``.

The embedded local cluster binds its dashboard to 127.0.0.1 and keeps Ray's token
authentication as Ray sets it up; attaching to an existing cluster takes its address.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray

from scheduler.errors import TilerunError

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
    # Token authentication stays on as Ray sets it up; its warning that it is on, printed on
    # every run, is not something the user has to act on.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    if dashboard is None:
        dashboard = os.environ.get("TILERUN_DASHBOARD", "1") != "0"
    if dashboard_host is None:
        dashboard_host = os.environ.get("TILERUN_DASHBOARD_HOST", "127.0.0.1")
    if address:
        check_address(address)
        _send_token_if_we_have_one()
        try:
            ctx = ray.init(address=address, **kwargs)
        except (RuntimeError, ConnectionError, ray.exceptions.RayError) as e:
            raise RayAttachError(_attach_hint(address, e)) from None
    else:
        # Logical CPUs: at least enough for a small TP group of CPU workers on a 2-core box.
        ncpu = num_cpus if num_cpus is not None else max(os.cpu_count() or 1, 4)
        # "local": a cluster of our own, even where `ray start` left one for plain ray.init()
        # calls to find (that one may belong to someone else, or be gone)
        ctx = ray.init(
            address="local",
            num_cpus=ncpu,
            include_dashboard=dashboard,
            dashboard_host=dashboard_host,
            **kwargs,
        )
        _start_reaper()
    _dashboard_url = getattr(ctx, "dashboard_url", None) or None
    return describe()


_dashboard_url: str | None = None

# How long to wait for a TCP answer from the cluster's address before saying nothing is there.
CONNECT_TIMEOUT_S = 5.0


class RayAttachError(TilerunError, ConnectionError):
    """The Ray cluster named by --ray-address cannot be reached or refuses us."""


def token_path() -> Path:
    """Where Ray keeps the cluster token (``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def check_address(address: str) -> None:
    """Answer in one line, within seconds, for an address where no Ray cluster can be: a host
    that does not resolve or a port where nothing listens (Ray itself retries for minutes)."""
    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise RayAttachError(
            f"--ray-address {address!r} is not host:port (the GCS address `ray start --head` "
            "prints, e.g. 127.0.0.1:6379)"
        )
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise RayAttachError(
            f"--ray-address {address!r}: cannot resolve host {host!r} ({e.strerror or e})"
        ) from None
    errors = []
    for family, kind, proto, _, where in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(CONNECT_TIMEOUT_S)
                s.connect(where)
                return
        except OSError as e:
            errors.append(e.strerror or type(e).__name__)
    raise RayAttachError(
        f"--ray-address {address!r}: no Ray cluster answers there ({errors[0]}); start one with "
        "`ray start --head`, or leave --ray-address out to start one in this process"
    )


def _send_token_if_we_have_one() -> None:
    """`ray start --head` turns token authentication on, but Ray's driver sends the token to an
    explicit address only when RAY_AUTH_MODE=token; do that when a token is at hand here and
    the user has not chosen a mode."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    if not (os.environ.get("RAY_AUTH_TOKEN") or token_path().is_file()):
        return
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()  # sets RAY_AUTH_MODE=token and refreshes Ray's cached config


def _attach_hint(address: str, e: Exception) -> str:
    last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    if "token" in str(e).lower() or "auth" in str(e).lower():
        return (
            f"the Ray cluster at {address} refused us: {last}. It uses token authentication; "
            f"its token is in ~/.ray/auth_token on the head node (`ray get-auth-token`): copy it "
            f"to {token_path()} here or set RAY_AUTH_TOKEN"
        )
    return f"cannot attach to the Ray cluster at {address}: {last}"


def _start_reaper() -> None:
    """Start ``cluster/reaper.py``: it kills this embedded cluster's processes if the driver
    dies without shutting it down (SIGKILL, a crash)."""
    import subprocess
    import sys

    subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("reaper.py")), str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


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
