"""Takes an embedded Ray cluster down with its driver, even a driver killed with SIGKILL.

``ensure_ray`` starts this script beside an embedded cluster: ``python reaper.py DRIVER_PID``.
Every second it notes the driver's descendants (Ray's GCS, raylet, dashboard, the agents the
raylet starts, worker processes and any ``mpiexec`` above them), each with its start time. Once
the driver is gone it kills those that are still there and exits. Without it, a killed driver
leaves the dashboard and runtime-env agents running for a minute or two.

It imports nothing but the standard library, so it starts in a fraction of a second, and it kills
only processes it saw descend from the driver (same pid *and* start time: no reused pid).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

POLL_S = 1.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of ``pid``, or None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    if rest[0] == "Z":
        return None
    return int(rest[1]), int(rest[19])


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is not None:
            children.setdefault(st[0], []).append(int(name))
            starts[int(name)] = st[1]
    out: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out[pid] = starts[pid]
        todo.extend(children.get(pid, []))
    return out


def watch(driver: int) -> None:
    me = os.getpid()
    driver_start = (_stat(driver) or (0, None))[1]
    seen: dict[int, int] = {}
    while True:
        st = _stat(driver)
        if st is None or st[1] != driver_start:
            break
        seen.update(descendants(driver))
        seen.pop(me, None)
        time.sleep(POLL_S)
    # the driver is gone: its tree may have been reparented, so kill what was seen, and what
    # the survivors started since
    for _ in range(3):
        for pid, start in list(seen.items()):
            st = _stat(pid)
            if st is None or st[1] != start:
                seen.pop(pid)
                continue
            seen.update({p: s for p, s in descendants(pid).items() if p != me})
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if not seen:
            return
        time.sleep(0.5)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C on the terminal is the driver's
    watch(int(sys.argv[1]))
