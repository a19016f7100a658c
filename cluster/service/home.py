"""Where the service keeps its state: ``--home DIR``, else ``TILERUN_HOME``, else ``~/.tilerun``.

``tasks.db`` is the task store; ``cluster.json`` says how to reach the Ray cluster (its address,
and the pid of the head when ``tilerun up`` started it, so ``down`` stops only that one);
``engine.json`` describes the running engine (model, capacity) so ``submit`` can refuse a task
that would never fit without asking Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

NAMESPACE = "tilerun"
ENGINE_NAME = "tilerun-engine"
WORKER_PREFIX = "tilerun-worker-"


def resolve_home(home: str | Path | None = None) -> Path:
    raw = home or os.environ.get("TILERUN_HOME") or "~/.tilerun"
    return Path(raw).expanduser().resolve()


def store_path(home: Path) -> Path:
    return home / "tasks.db"


def read_json(home: Path, name: str) -> dict[str, Any] | None:
    p = home / name
    if not p.is_file():
        return None
    return json.loads(p.read_text(encoding="utf-8"))


def write_json(home: Path, name: str, data: dict[str, Any]) -> None:
    """Atomic (write then rename), so a reader never sees half a file."""
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, home / name)


def remove_json(home: Path, name: str) -> None:
    (home / name).unlink(missing_ok=True)
