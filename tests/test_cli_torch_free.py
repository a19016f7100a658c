"""The service's client commands never import torch: ``tilerun submit`` answers at once.

Each command runs as a real ``tilerun`` process (``python -X importtime -m cluster.cli``) and
the interpreter's own import log is read: no ``torch`` module may appear. The submit path runs
for real against a task store and an ``engine.json`` such as ``tilerun up`` writes: a task is
stored, bad ones are refused with one line and nothing stored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.service.home import write_json
from cluster.service.spec import ServiceSpec
from cluster.service.store import TaskStore

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["submit", "status", "result", "cancel", "prune", "down", "dashboard"]


def tilerun(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``tilerun ARGS`` with Python's import log on; returns the process and the modules it
    imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cluster.cli", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    modules = [
        line.rsplit("|", 1)[1].strip()
        for line in p.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    ]
    p.stderr = "\n".join(x for x in p.stderr.splitlines() if not x.startswith("import time:"))
    return p, modules


def torch_modules(modules: list[str]) -> list[str]:
    return [m for m in modules if m == "torch" or m.startswith("torch.")]


@pytest.fixture
def home(tmp_path) -> Path:
    """A state directory whose engine record says: tiny model, 256 positions, 64 blocks."""
    spec = ServiceSpec.from_dict({"model": "tiny", "device": "cpu"})
    info = {
        "config": spec.to_dict(), "max_model_len": 256, "num_blocks": 64, "block_size": 16,
        "vocab_size": 512, "checkpoint": None, "devices": [], "started_at": 0.0,
    }  # fmt: skip
    write_json(tmp_path, "engine.json", info)
    return tmp_path


@pytest.mark.parametrize("command", COMMANDS)
def test_help_imports_no_torch(command):
    p, modules = tilerun(command, "--help")
    assert p.returncode == 0, p.stderr
    assert "usage: tilerun " + command in p.stdout
    assert modules, "the import log was not read"
    assert torch_modules(modules) == []


@pytest.mark.slow  # a dozen interpreters
def test_submit_validates_and_stores_without_torch(home, tmp_path):
    p, modules = tilerun(
        "submit", "--prompt-token-ids", "1,2,3", "--max-new-tokens", "2", "--json",
        "--home", str(home),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    task_id = json.loads(p.stdout)["id"]
    assert torch_modules(modules) == []
    job = tmp_path / "job.yaml"
    job.write_text("prompt: Once upon a time\nmax_new_tokens: 4\n")
    p, modules = tilerun("submit", str(job), "--home", str(home))  # text: the tokenizer runs
    assert p.returncode == 0, p.stderr
    assert torch_modules(modules) == []
    stored = TaskStore(home / "tasks.db").list()
    assert {t.id for t in stored} == {task_id, p.stdout.strip()}
    # refused in one line each, nothing stored: a token outside the vocabulary, a task that
    # cannot fit the context, an engine field that differs from the running engine's
    job.write_text("prompt: hi\nmodel: llama2-7b\n")
    for args, says in [
        (("--prompt-token-ids", "1,2,999"), "outside the model's vocabulary"),
        (("--prompt", "hi", "--max-new-tokens", "5000"), "exceeds the model's context limit"),
        ((str(job),), "model"),
    ]:
        p, modules = tilerun("submit", *args, "--home", str(home))
        assert p.returncode == 2
        assert p.stderr.startswith("tilerun: error: ") and says in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert torch_modules(modules) == []
    assert len(TaskStore(home / "tasks.db").list()) == 2
    for command, rc in [(("status", "--json"), 0), (("cancel", task_id), 0),
                        (("result", task_id, "--json"), 2)]:  # fmt: skip
        p, modules = tilerun(*command, "--home", str(home))
        assert p.returncode == rc, p.stderr
        assert torch_modules(modules) == []
    assert "was cancelled" in p.stderr


def test_prune_deletes_only_finished_tasks_its_rules_let_go(home):
    """`tilerun prune` through a real process over a real store: queued and running tasks stay
    whatever the rules say; --dry-run deletes nothing; a bad age is refused in one line."""
    s = TaskStore(home / "tasks.db")
    ids = [s.add([1], {"max_new_tokens": 1}) for _ in range(5)]
    old_done, old_failed, new_done, running, queued = ids
    for i in (old_done, old_failed, new_done, running):
        s.start(i)
    s.finish(old_done, "done", output={"token_ids": [2], "metrics": {}})
    s.finish(old_failed, "failed", error="boom")
    s.finish(new_done, "done", output={"token_ids": [2], "metrics": {}})
    # the first two finished ten days ago
    s._db.execute(
        "UPDATE tasks SET finished_at = finished_at - 864000 WHERE id IN (?, ?)",
        (old_done, old_failed),
    )
    p, modules = tilerun("prune", "--older-than", "7d", "--dry-run", "--json", "--home", str(home))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"would_delete": [old_done, old_failed]}
    assert torch_modules(modules) == []
    assert len(s.list()) == 5
    p, _ = tilerun("prune", "--keep", "2", "--home", str(home))  # the two latest finished stay
    assert p.returncode == 0 and p.stdout.strip() == "deleted 1 finished task(s)", p.stderr
    assert [t.id for t in s.list()] == [old_failed, new_done, running, queued]
    p, _ = tilerun("prune", "--older-than", "0s", "--keep", "0", "--json", "--home", str(home))
    assert json.loads(p.stdout) == {"deleted": [old_failed, new_done]}
    assert [t.id for t in s.list()] == [running, queued]
    for args, says in [(("--older-than", "7x"), "'7x' is not an age"), ((), "prune needs a rule"),
                       (("--keep", "-1"), "--keep must be 0 or more")]:  # fmt: skip
        p, _ = tilerun("prune", *args, "--home", str(home))
        assert p.returncode == 2 and says in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) <= 3, p.stderr  # argparse adds its usage
    assert [t.id for t in s.list()] == [running, queued]
