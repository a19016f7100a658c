"""Headless Chromium for the status-page tests and the README screenshot (the OS package).

``./scripts/test`` installs Debian's ``chromium`` when it is missing and it runs as root; where
that was impossible, :func:`chromium` fails the test with the reason instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",  # root in a container has no user namespace for the sandbox
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium() -> str:
    """The browser binary: ``TILERUN_CHROMIUM``, else ``chromium``/``chromium-browser`` on PATH."""
    exe = os.environ.get("TILERUN_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None
    )
    if not exe:
        pytest.fail(
            "headless Chromium not found: run ./scripts/test as root (it installs the OS "
            "package), or `apt-get install chromium`, or set TILERUN_CHROMIUM to the binary"
        )
    return exe


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="tilerun-chromium-") as profile:
        cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def dump_dom(url: str, budget_ms: int = 5000, timeout: float = 120) -> str:
    """The DOM after the page's scripts ran for ``budget_ms`` of virtual time."""
    r = _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)
    if r.returncode != 0:
        raise RuntimeError(f"chromium exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout


def screenshot(
    url: str, path: str, size: tuple[int, int] = (1280, 900), budget_ms: int = 5000
) -> None:
    """A PNG of the page as rendered at ``size`` (CSS pixels) after ``budget_ms``."""
    r = _run(
        [
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={os.path.abspath(path)}",
            url,
        ],
        timeout=120,
    )
    if r.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"chromium screenshot failed ({r.returncode}): {r.stderr[-2000:]}")
