"""`scripts/chaos_service.py` at a small size: a real service whose engine and worker are
SIGKILLed, and whose worker is SIGSTOPped, while tasks run and arrive keeps every task, and each
ends with `tilerun run`'s tokens (sampled ones with a seed included)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def test_no_task_lost_or_changed_by_engine_and_worker_kills_and_a_stall(tmp_path):
    out = tmp_path / "chaos.json"
    r = subprocess.run(
        [sys.executable, "scripts/chaos_service.py", "--tasks", "8", "--kills", "3",
         "--victims", "engine", "worker", "stall", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(out.read_text())
    s = got["summary"]
    assert (s["tasks"], s["lost"], s["not_done"], s["mismatched"]) == (8, 0, 0, 0)
    victims = [k["victim"] for k in got["kills"]]
    assert victims == ["engine", "worker", "stall"]
    assert got["kills"][-1]["engine_restarts"] == 1  # Ray restarted it: no `tilerun up` ran
    assert s["stalls"] == 1 and s["stalled_processes_left"] == 0
    assert s["tasks_rerun"] >= 1 and any(row["sampled"] for row in got["rows"])
