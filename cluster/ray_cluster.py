"""Starting or attaching to a Ray cluster, the only place tilerun calls ``ray.init``.

The embedded local cluster binds its dashboard to 127.0.0.1 and keeps Ray's token
authentication as Ray sets it up; attaching to an existing cluster takes its address.
:func:`start_ray_early` begins either in a background thread, beside the driver's own imports
and checks; :func:`ensure_ray` then waits for that start rather than beginning another.
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  (before any start: see start_ray_early)
import logging
import os
import socket
import threading
from concurrent.futures import Future, wait
from pathlib import Path

import ray

from cluster.dashboard_choice import choose_dashboard
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

    Where :func:`start_ray_early` began a start, this waits for that one (whatever the
    arguments here) and raises its error, if it failed, in this caller's thread.
    """
    early = _early
    if early is not None:
        try:
            early.result()
        except BaseException:
            if early.done():  # it failed (not: interrupted while waiting); the next call retries
                _forget_early(early)
            raise
    return _start(address, num_cpus, dashboard, dashboard_host)


def start_ray_early(address: str | None = None) -> None:
    """Begin ``ensure_ray(address)`` in a background thread and return at once.

    Ray's start takes seconds, mostly spent waiting for its processes; begun before the
    driver's heavy imports and checks, it runs beside them. The next :func:`ensure_ray` waits
    for it. Does nothing where Ray is up or a start is under way.
    """
    # This thread forks Ray's processes while the caller goes on importing. A module that
    # registers fork handlers in pairs (concurrent.futures.thread: acquire before a fork,
    # release after it), imported for the first time in the middle of such a fork, gets its
    # release run without its acquire: "Exception ignored ... release unlocked lock" on stderr
    # (CPython; seen 1 run in 12 of `tilerun run` under load). So it is imported with this
    # module, before any start.
    global _early, _early_release
    with _early_lock:
        if _early is not None or ray.is_initialized():
            return
        _early, _early_release = Future(), threading.Event()
        threading.Thread(
            target=_start_in_background,
            args=(_early, _early_release, address),
            name="tilerun-ray-start",
            daemon=True,
        ).start()


_early: Future | None = None  # the start begun by start_ray_early
_early_release = threading.Event()  # set: the thread of that start may end
_early_lock = threading.Lock()


def _start_in_background(done: Future, release: threading.Event, address: str | None) -> None:
    # Ray notes that it set no SIGTERM handler outside the main thread: the CLI has its own
    # (cluster.signals), and a driver killed by SIGTERM takes its cluster along all the same
    # (the reaper, and Ray's fate sharing below).
    logging.getLogger("ray._private.worker").addFilter(_no_sigterm_notice)
    try:
        done.set_result(_start(address))
    except BaseException as e:  # ensure_ray raises it again, in its caller's thread
        done.set_exception(e)
        return
    # Ray starts its GCS, raylet and dashboard with PR_SET_PDEATHSIG, which fires when the
    # *thread* that started them ends, not the process: this one lives until shutdown_ray.
    release.wait()


def _no_sigterm_notice(record: logging.LogRecord) -> bool:
    return "SIGTERM handler is not set" not in record.getMessage()


def _forget_early(early: Future) -> None:
    global _early
    with _early_lock:
        if _early is early:
            _early = None
            _early_release.set()


def _start(
    address: str | None = None,
    num_cpus: int | None = None,
    dashboard: bool | None = None,
    dashboard_host: str | None = None,
) -> dict:
    global _dashboard_url, _dashboard_note
    if ray.is_initialized():
        return describe()
    address = address or os.environ.get("RAY_ADDRESS")
    # Token authentication stays on as Ray sets it up; its warning that it is on, printed on
    # every run, is not something the user has to act on.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
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
        if dashboard is None:  # where its packages are missing, Ray would not start at all
            dashboard, _dashboard_note = choose_dashboard()
        # the reaper first: a driver that exits while Ray is still starting (a failed check
        # beside start_ray_early) leaves nothing behind either
        _start_reaper()
        # "local": a cluster of our own, even where `ray start` left one for plain ray.init()
        # calls to find (that one may belong to someone else, or be gone)
        ctx = ray.init(
            address="local",
            num_cpus=ncpu,
            include_dashboard=dashboard,
            dashboard_host=dashboard_host,
            **kwargs,
        )
    _dashboard_url = getattr(ctx, "dashboard_url", None) or None
    return describe()


_dashboard_url: str | None = None
_dashboard_note: str | None = None  # why the embedded cluster has no dashboard

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
    elif _dashboard_note:
        info["dashboard_off"] = _dashboard_note
    return info


def shutdown_ray() -> None:
    early = _early
    if early is not None:
        wait([early])  # a start still under way would leave its cluster up after this call
    if ray.is_initialized():
        ray.shutdown()
    if early is not None:
        _forget_early(early)
