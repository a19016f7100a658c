"""The demo script as a user runs it, and the cluster's security defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_demo_runs_a_long_prompt_on_an_embedded_cluster():
    r = subprocess.run(
        [sys.executable, "scripts/demo.py", "--device", "cpu", "--prompt-tokens", "8192",
         "--new-tokens", "4", "--prefill-chunk", "2048"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "8192/8192 tokens" in out  # progress during prefill
    for line in ("prompt tokens", "prefill", "time to first token", "decode", "peak memory"):
        assert line in out, out
    assert "Ray dashboard (token auth): http://127.0.0.1:" in out


CHECK_DASHBOARD = """
import urllib.error, urllib.request
from cluster.ray_cluster import ensure_ray, shutdown_ray
info = ensure_ray(num_cpus=1, dashboard=True)
url = info["dashboard"]
assert url.startswith("http://127.0.0.1:"), url
try:
    urllib.request.urlopen(url + "/api/version", timeout=10)
    print("OPEN")
except urllib.error.HTTPError as e:
    print("STATUS", e.code)
shutdown_ray()
"""


def test_dashboard_binds_loopback_and_requires_the_token():
    r = subprocess.run(
        [sys.executable, "-c", CHECK_DASHBOARD], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "STATUS 401" in r.stdout, r.stdout + r.stderr[-2000:]
