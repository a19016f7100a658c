"""The Ray head that ``tilerun up`` starts, and stops again on ``tilerun down``.

``ray start --head --block`` runs as a child in its own session, so it outlives ``up`` and its
processes (GCS, raylet, dashboard, Ray's workers) form one process group that ``down`` can stop
without touching anyone else's cluster on the machine (never ``ray stop``, which stops them all).
Everything binds to 127.0.0.1 on ports picked free for this cluster, the dashboard included, and
token authentication is on (``RAY_AUTH_MODE=token``; the token is Ray's own, ``~/.ray/auth_token``
or ``RAY_AUTH_TOKEN``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cluster.dashboard_choice import choose_dashboard
from scheduler.errors import TilerunError


class HeadError(TilerunError, RuntimeError):
    """The Ray head could not be started or stopped."""


def ray_env() -> dict[str, str]:
    """Environment for Ray processes and clients of a tilerun cluster: token auth on."""
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def ensure_token() -> None:
    """Make Ray's token if there is none yet (Ray's own command; its output, the token, is kept
    off the terminal)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").is_file():
        return
    subprocess.run(
        [*_ray_cli(), "get-auth-token", "--generate"],
        env=ray_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )


def _ray_cli() -> list[str]:
    """Ray's command line: the ``ray`` beside this interpreter, else Ray's CLI module run by
    it (Ray installed without its scripts, as with ``pip install --target``; a ``ray`` on the
    PATH could be another Python's, of another version)."""
    exe = Path(sys.executable).parent / "ray"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


#: where the head's listeners are picked: below the kernel's ephemeral range (Linux: 32768 on),
#: from which every process's outgoing and port-0 sockets draw, and above Ray's worker ports
#: (10002-19999). A port picked from the ephemeral range and released again could be taken
#: before Ray bound it (seen in CI: the client server's port, "Failed to bind to address").
HEAD_PORTS = range(20000, 32768)
#: `ray start` tries, new ports each time, when one of its listeners finds its port taken
START_TRIES = 3
#: how long a started head must stay up when its client server's port never answers
CLIENT_GRACE_S = 15.0


def free_ports(n: int, rng: random.Random | None = None) -> list[int]:
    """``n`` distinct loopback ports of ``HEAD_PORTS`` free now. The sockets are held open
    together while the ports are picked, so no two are the same (two of Ray's components given
    one port make `ray start` exit: seen with the GCS and the client server)."""
    rng = rng or random.Random()
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for port in rng.sample(HEAD_PORTS, 200):
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
            if len(ports) == n:
                return ports
        # a crowded range: whatever the kernel hands out
        socks = [stack.enter_context(socket.socket()) for _ in range(n - len(ports))]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return ports + [s.getsockname()[1] for s in socks]


def _answers(port: int) -> bool:
    """Something accepts connections on loopback ``port``."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _port_taken(log_path: Path) -> bool:
    tail = log_path.read_bytes()[-20000:].lower()
    return b"failed to bind" in tail or b"address already in use" in tail


def temp_dir_for(home: Path) -> Path:
    # Ray puts Unix sockets under its temp dir; their paths must stay under ~100 characters,
    # so the dir is short and derived from the home (one cluster per home).
    return Path("/tmp") / f"tilerun-{hashlib.sha1(str(home).encode()).hexdigest()[:10]}"


def start_head(home: Path, num_cpus: int | None = None, timeout_s: float = 120.0) -> dict:
    """Start a Ray head for ``home``; returns what ``cluster.json`` records about it. Where a
    listener finds its port taken after all (another process bound it between the pick and
    Ray's bind), `ray start` is run again on new ports, ``START_TRIES`` times in all."""
    ensure_token()
    log_path = home / "ray-head.log"
    home.mkdir(parents=True, exist_ok=True)
    attempt = 1
    while True:
        try:
            return _start_head_once(home, log_path, num_cpus, timeout_s)
        except HeadError:
            if attempt == START_TRIES or not _port_taken(log_path):
                raise
            os.replace(log_path, log_path.with_suffix(f".{attempt}.log"))  # kept to read
            attempt += 1


def _start_head_once(home: Path, log_path: Path, num_cpus: int | None, timeout_s: float) -> dict:
    gcs, dash, client, agent, metrics = free_ports(5)
    # Ray's GCS and raylet bind to the node's IP (Ray picks it); the dashboard, the client
    # server and the agents stay on loopback.
    temp = temp_dir_for(home)
    ncpu = num_cpus if num_cpus is not None else max(os.cpu_count() or 1, 4)
    # as for the embedded cluster: none where its packages are missing (`ray start` would fail)
    dashboard, why_not = choose_dashboard()
    cmd = [
        *_ray_cli(), "start", "--head", "--block", "--disable-usage-stats",
        f"--port={gcs}", f"--num-cpus={ncpu}",
        f"--include-dashboard={'true' if dashboard else 'false'}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
        f"--temp-dir={temp}",
    ]  # fmt: skip
    address_file = temp / "ray_current_cluster"
    address_file.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=ray_env(),
        )
    deadline = time.monotonic() + timeout_s
    started_at = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stop_head({"pid": proc.pid})  # whatever it started and left in its group
            raise HeadError(
                f"`ray start --head` exited with code {proc.returncode}; see {log_path}. "
                "Fix: read the log's last lines (a port in use? run `tilerun up` again)"
            )
        # "started" is printed before the client server has bound its port; one that then
        # finds it taken makes `ray start` stop the whole head a few seconds later (seen in
        # CI), so the head counts as up once that port answers too (or, should a Ray build
        # start no client server, once the head has stayed up CLIENT_GRACE_S without it)
        if started_at is None and b"Ray runtime started" in log_path.read_bytes():
            started_at = time.monotonic() if address_file.is_file() else None
        if started_at is not None and (
            _answers(client) or time.monotonic() - started_at > CLIENT_GRACE_S
        ):
            # the address Ray itself uses (its node IP), as `ray start` wrote it
            address = address_file.read_text().strip()
            break
        time.sleep(0.5)
    else:
        stop_head({"pid": proc.pid})
        raise HeadError(
            f"the Ray head did not start within {timeout_s:.0f}s; see {log_path}. "
            "Fix: check the machine's load, or start Ray yourself and use `tilerun up --address`"
        )
    return {
        "address": address,
        "started_by_tilerun": True,
        "pid": proc.pid,
        "temp_dir": str(temp),
        "dashboard": f"http://127.0.0.1:{dash}" if dashboard else why_not,
        "log": str(log_path),
    }


def head_alive(info: dict) -> bool:
    pid = info.get("pid")
    return bool(pid) and bool(group_pids(pid))


def stop_head(info: dict, grace_s: float = 30.0) -> None:
    """Stop the head started for this home: SIGTERM to ``ray start`` (which stops the processes
    it started), then SIGKILL to whatever is left in its process group. Only that group."""
    pid = info.get("pid")
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and head_alive(info):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child
        time.sleep(0.3)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and head_alive(info):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)


def group_pids(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (tests: nothing of ours is left after down)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields: state ppid pgrp ...; zombies are gone for every purpose but the parent's
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out
