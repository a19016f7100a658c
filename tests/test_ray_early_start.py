"""``start_ray_early`` (#12): Ray's start begun in a background thread is the one the executor
uses (one cluster, not two), and a failed start surfaces in the caller's thread with the
message ``ensure_ray`` gives today.

Each case runs in a fresh interpreter: the test session may hold a Ray cluster already, and
then there is nothing to start early.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, timeout: int = 300) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TILERUN_DASHBOARD": "0"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SIGTERM handler is not set" not in r.stderr  # Ray's note from a non-main thread
    return json.loads(r.stdout.strip().splitlines()[-1])


ONE_CLUSTER = """
import json, threading
import ray
from cluster import ray_cluster
inits = []
real_init = ray.init
def counted(*a, **k):
    inits.append(threading.current_thread().name)
    return real_init(*a, **k)
ray.init = counted
ray_cluster.start_ray_early()
ray_cluster.start_ray_early()  # a start is under way: nothing more
from cluster.api import LLM
from scheduler.request import SamplingParams
with LLM(model="tiny", device="cpu") as llm:
    out = llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0]
    address = llm.engine.executor.cluster["address"]
same = ray_cluster.ensure_ray()["address"] == address
ray_cluster.shutdown_ray()
print(json.dumps({"inits": inits, "tokens": len(out.token_ids), "same": same,
                  "after": ray.is_initialized()}))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_executor_uses_the_early_start():
    r = _python(ONE_CLUSTER)
    assert r["inits"] == ["tilerun-ray-start"]  # one ray.init, in the background thread
    assert r["tokens"] == 2
    assert r["same"] and not r["after"]


ATTACH_ERROR = """
import json
from cluster import ray_cluster
from cluster.ray_cluster import RayAttachError, ensure_ray, start_ray_early
out = {}
for address in ("not-a-host", "127.0.0.1:1"):
    try:
        ensure_ray(address)
    except RayAttachError as e:
        direct = str(e)
    start_ray_early(address)
    try:
        ensure_ray()
    except RayAttachError as e:
        out[address] = [direct, str(e), ray_cluster._early is None]
print(json.dumps(out))
"""


def test_attach_error_of_an_early_start_is_raised_by_ensure_ray():
    r = _python(ATTACH_ERROR, timeout=120)
    assert set(r) == {"not-a-host", "127.0.0.1:1"}
    for direct, early, forgotten in r.values():
        assert early == direct  # the same message as without the early start
        assert forgotten  # the next ensure_ray starts afresh
    assert "is not host:port" in r["not-a-host"][1]
    assert "no Ray cluster answers there" in r["127.0.0.1:1"][1]


def test_fork_handler_modules_are_imported_before_any_early_start():
    """The early start forks Ray's processes while the driver goes on importing. A module that
    registers paired fork handlers (``concurrent.futures.thread``), first imported in the middle
    of such a fork, has its after-fork release run without its acquire, and CPython prints
    "release unlocked lock" on stderr: ``tilerun run`` did so in 1 run of 12 under load. It is
    imported with ``cluster.ray_cluster``, before ``start_ray_early`` can be called."""
    out = _python(
        "import json, sys; import cluster.ray_cluster; "
        "print(json.dumps('concurrent.futures.thread' in sys.modules))",
        timeout=120,
    )
    assert out is True
