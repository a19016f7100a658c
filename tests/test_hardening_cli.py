"""``tilerun run`` and the demo as a careless user or a signal meets them (#9): one line, the
right exit code, bounded waits, nothing left running."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: int = 120, env: dict | None = None):
    return subprocess.run(
        args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "cluster.cli", "run", *args], **kw)


def _one_line_error(r: subprocess.CompletedProcess, expected: str, prefix: str = "tilerun") -> None:
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"{prefix}: error: ") and expected in lines[0], lines[0]


def test_demo_refuses_zero_prompt_tokens():
    r = _run([sys.executable, "scripts/demo.py", "--prompt-tokens", "0"])
    _one_line_error(r, "--prompt-tokens must be at least 1, got 0", prefix="demo")


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1:1", "no Ray cluster answers there"),
        ("not-a-host:6379", "cannot resolve host 'not-a-host'"),
        ("not-a-host", "is not host:port"),
    ],
)
def test_unreachable_ray_address_is_one_line_within_seconds(address, expected):
    t0 = time.monotonic()
    r = _cli("--prompt", "hi", "--device", "cpu", "--ray-address", address, timeout=60)
    _one_line_error(r, expected)
    assert time.monotonic() - t0 < 20  # Ray alone retried for over 4 minutes


def _tree(pid: int) -> set[int]:
    """``pid`` and its live descendants."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    rest = f.read().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            if rest[0] != "Z":
                kids.setdefault(int(rest[1]), []).append(int(name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(kids.get(p, []))
    return out


def _alive(pids: set[int]) -> set[int]:
    left = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(") ", 1)[1][0] != "Z":
                    left.add(p)
        except OSError:
            pass
    return left


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and _alive(pids):
        time.sleep(0.5)
    return _alive(pids)


LONG_RUN = [
    sys.executable, "-m", "cluster.cli", "run", "--model", "tiny", "--device", "cpu",
    "--prompt-token-ids", "1,2,3", "--max-new-tokens", "4000", "--max-model-len", "4096",
]  # fmt: skip


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_says_what_was_generated_and_leaves_nothing(sig, code):
    p = subprocess.Popen(
        [*LONG_RUN, "--json"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "TILERUN_DASHBOARD": "0"},
    )  # fmt: skip
    try:
        # wait until the workers run: the tree then holds Ray's processes and the actor
        deadline = time.monotonic() + 240
        tree: set[int] = set()
        while time.monotonic() < deadline and p.poll() is None:
            tree = _tree(p.pid)
            if any(b"WorkerActor" in _cmdline(q) for q in tree):
                break
            time.sleep(1)
        time.sleep(3)  # a few decode steps
        tree = _tree(p.pid)
        t0 = time.monotonic()
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"tilerun: interrupted by {signal.Signals(sig).name}"), err
    assert "Token authentication is enabled" not in err  # Ray's notice, every run before
    result = json.loads(out)
    assert result["finish_reason"] == "interrupted"
    assert result["token_ids"] == result["token_ids"][: len(result["token_ids"])]
    assert took < 30
    assert not _wait_gone(tree - {p.pid}, 60), "processes left behind"


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


DRIVER = """
import os, sys, time
from cluster.ray_cluster import ensure_ray
ensure_ray(num_cpus=1, dashboard=True)
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_killed_driver_leaves_no_cluster_processes():
    p = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
        time.sleep(5)  # the raylet starts its agents after ray.init returns
        tree = _tree(p.pid) - {p.pid}
        assert len(tree) >= 4, tree  # gcs, raylet, dashboard, agents, the reaper
        p.kill()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    left = _wait_gone(tree, 30)
    assert not left, [(q, _cmdline(q)[:80]) for q in left]


@pytest.mark.ray
@pytest.mark.slow
def test_attaches_to_a_cluster_started_by_plain_ray_start(tmp_path):
    """`ray start --head` turns token auth on; attaching sends the token it wrote, with no
    RAY_AUTH_MODE to export."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    temp_dir = tempfile.mkdtemp(prefix="trh-", dir="/tmp")  # short: Ray's socket paths
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", "--block",
         # its own temp dir: a cluster under /tmp/ray would be found by every plain ray.init()
         # on this host, other test runs' included
         f"--temp-dir={temp_dir}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # until the GCS answers
            with socket.socket() as s, contextlib.suppress(OSError):
                s.settimeout(1)
                s.connect(("127.0.0.1", port))
                break
            time.sleep(1)
        time.sleep(5)  # the raylet registers after the GCS listens
        r = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "run", "--model", "tiny", "--device", "cpu",
             "--prompt-token-ids", "1,2,3", "--max-new-tokens", "3", "--json",
             "--ray-address", f"127.0.0.1:{port}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        tree = _tree(head.pid)
        head.terminate()  # `ray start --block` stops what it started on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=60)
        for pid in _wait_gone(tree, 30):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not Path("/tmp/ray/ray_current_cluster").exists() or (
        f":{port}" not in Path("/tmp/ray/ray_current_cluster").read_text()
    ), "the test cluster must not become every plain ray.init()'s default"
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads(r.stdout)["token_ids"]) == 3
    assert "Token authentication is enabled" not in r.stderr


def test_embedded_cluster_ignores_a_cluster_left_by_ray_start():
    """Without --ray-address tilerun starts its own cluster, even where the Ray temp dir names a
    cluster `ray start` left (possibly someone else's, possibly dead)."""
    tmp = tempfile.mkdtemp(prefix="trh-", dir="/tmp")  # short: Ray's socket paths
    try:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
        code = (
            "from cluster.ray_cluster import ensure_ray, shutdown_ray\n"
            "print(ensure_ray(num_cpus=1, dashboard=False)['address']); shutdown_ray()"
        )
        r = _run([sys.executable, "-c", code], timeout=180, env={"RAY_TMPDIR": tmp})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "127.0.0.1:1" not in r.stdout
