"""The task store: SQLite in WAL mode, one row per task, written before ``submit`` answers.

The store is the truth: the engine actor reads queued tasks from it in arrival order and writes
progress and results back; the commands read it directly, so tasks outlive any engine. Every
write is one short transaction, so many processes can submit at once (SQLite serialises writers;
``busy_timeout`` makes them wait instead of failing).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "done", "failed", "cancelled")
TERMINAL = ("done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    n INTEGER PRIMARY KEY AUTOINCREMENT,    -- arrival order
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    prompt_text TEXT,
    prompt_token_ids TEXT NOT NULL,         -- JSON list of ints
    params TEXT NOT NULL,                   -- JSON: engine-independent sampling parameters
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    prefill_done INTEGER NOT NULL DEFAULT 0,
    generated INTEGER NOT NULL DEFAULT 0,
    decode_tokens_per_s REAL,
    ttft_s REAL,
    output TEXT,                            -- JSON, the schema of `tilerun run --json`
    error TEXT,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state, n);
-- the tokens a running task has generated so far (its current attempt), for `result --follow`,
-- apart from tasks so that listing tasks never reads them, gone when the attempt ends
-- (no semicolons in these comments: the schema is split on them)
CREATE TABLE IF NOT EXISTS partial (
    id TEXT PRIMARY KEY,
    attempt INTEGER NOT NULL,
    token_ids TEXT NOT NULL                 -- JSON list of ints
);
-- suspects: tasks that ran in a step that raised, or in two runs that failed, which the engine
-- runs alone until they end (a task that makes runs fail then fails by itself), gone at the end
CREATE TABLE IF NOT EXISTS suspects (
    id TEXT PRIMARY KEY
);
"""


@dataclass(frozen=True)
class Task:
    """One row of the store, as the commands and the engine see it."""

    id: str
    n: int
    state: str
    prompt_text: str | None
    prompt_token_ids: list[int]
    params: dict[str, Any]
    attempts: int
    cancel_requested: bool
    prefill_done: int
    generated: int
    decode_tokens_per_s: float | None
    ttft_s: float | None
    output: dict | None
    error: str | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def prefill_total(self) -> int:
        return len(self.prompt_token_ids)

    def summary(self) -> dict[str, Any]:
        """The task as in the engine's ``snapshot()['tasks']`` (no prompt, no output)."""
        return {
            "id": self.id,
            "state": self.state,
            "prefill_done": self.prefill_done,
            "prefill_total": self.prefill_total,
            "generated": self.generated,
            "max_new_tokens": self.params.get("max_new_tokens"),
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "ttft_s": self.ttft_s,
            "context_len": self.prefill_total + self.generated,
            "attempts": self.attempts,
            "error": self.error,
            "submitted_at": self.submitted_at,
            "finished_at": self.finished_at,
        }


class TaskStore:
    """Tasks in ``<home>/tasks.db``. Cheap to open; open one per process (or thread)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: each statement, or each explicit BEGIN ... COMMIT, is one transaction.
        # One thread at a time uses a TaskStore (the engine's loop makes it and hands it to its
        # thread; readers on other threads open their own).
        self._db = sqlite3.connect(
            str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout = 60000")
        self._db.execute("PRAGMA journal_mode = WAL")
        # FULL: a task is on disk when submit answers, even if the machine loses power after
        self._db.execute("PRAGMA synchronous = FULL")
        with self._tx():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)

    @contextmanager
    def _tx(self):
        # IMMEDIATE takes the write lock up front, so two writers never both read-then-write
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # -- the submitting side -----------------------------------------------------------------
    def add(
        self, prompt_token_ids: list[int], params: dict[str, Any], prompt_text: str | None = None
    ) -> str:
        """Store a queued task and return its id; committed when this returns."""
        task_id = uuid.uuid4().hex[:12]
        now = time.time()
        with self._tx():
            self._db.execute(
                "INSERT INTO tasks (id, state, prompt_text, prompt_token_ids, params, "
                "submitted_at, updated_at) VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                (
                    task_id,
                    prompt_text,
                    json.dumps(list(prompt_token_ids)),
                    json.dumps(params),
                    now,
                    now,
                ),
            )
        return task_id

    def request_cancel(self, task_id: str) -> str:
        """Cancel a queued task at once; mark a running one for the engine. Returns the state."""
        with self._tx():
            row = self._db.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                return "unknown"
            if row["state"] == "queued":
                now = time.time()
                self._db.execute(
                    "UPDATE tasks SET state = 'cancelled', finished_at = ?, updated_at = ? "
                    "WHERE id = ?",
                    (now, now, task_id),
                )
                self._drop_run_rows(task_id)  # a task queued again after a failed run has them
                return "cancelled"
            if row["state"] == "running":
                self._db.execute(
                    "UPDATE tasks SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                    (time.time(), task_id),
                )
            return row["state"]

    # -- reading -----------------------------------------------------------------------------
    def get(self, task_id: str) -> Task | None:
        row = self._db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return _task(row) if row else None

    def find(self, prefix: str) -> list[Task]:
        """Tasks whose id starts with ``prefix`` (ids may be shortened, as with git hashes)."""
        rows = self._db.execute(
            "SELECT * FROM tasks WHERE id LIKE ? ORDER BY n", (prefix.replace("%", "") + "%",)
        ).fetchall()
        return [_task(r) for r in rows]

    def list(self, states: tuple[str, ...] = STATES, limit: int | None = None) -> list[Task]:
        q = f"SELECT * FROM tasks WHERE state IN ({','.join('?' * len(states))}) ORDER BY n"
        if limit is not None:
            q += f" LIMIT {int(limit)}"
        return [_task(r) for r in self._db.execute(q, states).fetchall()]

    def recent(self, limit: int) -> list[Task]:
        """Every queued or running task, and the latest ``limit`` finished ones, in arrival order."""
        rows = self._db.execute(
            "SELECT * FROM tasks WHERE state IN ('queued', 'running') UNION "
            "SELECT * FROM (SELECT * FROM tasks WHERE state NOT IN ('queued', 'running') "
            "ORDER BY n DESC LIMIT ?) ORDER BY n",
            (int(limit),),
        ).fetchall()
        return [_task(r) for r in rows]

    def counts(self) -> dict[str, int]:
        got = dict(self._db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall())
        return {s: got.get(s, 0) for s in STATES}

    # -- the engine's side -------------------------------------------------------------------
    def start(self, task_id: str) -> int:
        """queued -> running; counts one attempt. Returns the attempt number."""
        now = time.time()
        with self._tx():
            self._db.execute(
                "UPDATE tasks SET state = 'running', attempts = attempts + 1, prefill_done = 0, "
                "generated = 0, started_at = ?, updated_at = ? WHERE id = ? AND state = 'queued'",
                (now, now, task_id),
            )
            return self._db.execute(
                "SELECT attempts FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()[0]

    def progress(
        self,
        updates: list[tuple[str, int, int, float | None, float | None]],
        tokens: dict[str, tuple[int, list[int]]] | None = None,
    ) -> None:
        """(id, prefill_done, generated, decode tokens/s, ttft_s) for running tasks, and
        ``tokens``: id -> (attempt, the tokens it has generated) where they changed; in one go."""
        if not updates and not tokens:
            return
        now = time.time()
        with self._tx():
            self._db.executemany(
                "UPDATE tasks SET prefill_done = ?, generated = ?, decode_tokens_per_s = ?, "
                "ttft_s = ?, updated_at = ? WHERE id = ? AND state = 'running'",
                [(p, g, tps, ttft, now, i) for i, p, g, tps, ttft in updates],
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO partial (id, attempt, token_ids) SELECT ?, ?, ? "
                "WHERE EXISTS (SELECT 1 FROM tasks WHERE id = ? AND state = 'running' "
                "AND attempts = ?)",
                [(i, a, json.dumps(t), i, a) for i, (a, t) in (tokens or {}).items()],
            )

    def partial(self, task_id: str) -> tuple[int, list[int]] | None:
        """(attempt, tokens generated so far) of a running task, as last written (twice a
        second); None before its first token or once it has ended."""
        row = self._db.execute(
            "SELECT attempt, token_ids FROM partial WHERE id = ?", (task_id,)
        ).fetchone()
        return (row[0], json.loads(row[1])) if row else None

    def finish(
        self, task_id: str, state: str, output: dict | None = None, error: str | None = None
    ) -> None:
        """running (or queued) -> done | failed | cancelled, with the output or the reason."""
        if state not in TERMINAL:
            raise ValueError(f"state {state!r} is not terminal; use one of {TERMINAL}")
        now = time.time()
        m = (output or {}).get("metrics", {})
        with self._tx():
            self._db.execute(
                "UPDATE tasks SET state = ?, output = ?, error = ?, finished_at = ?, updated_at = ?, "
                "generated = COALESCE(?, generated), ttft_s = COALESCE(?, ttft_s), "
                "decode_tokens_per_s = COALESCE(?, decode_tokens_per_s), "
                "prefill_done = CASE WHEN ? THEN json_array_length(prompt_token_ids) "
                "ELSE prefill_done END WHERE id = ?",
                (
                    state,
                    json.dumps(output) if output is not None else None,
                    error,
                    now,
                    now,
                    m.get("generated_tokens"),
                    m.get("ttft_s"),
                    m.get("decode_tokens_per_s"),
                    1 if output is not None else 0,
                    task_id,
                ),
            )
            self._drop_run_rows(task_id)

    def _drop_run_rows(self, task_id: str) -> None:
        """An ended task's rows beside it: the tokens kept for a re-run, the suspect mark."""
        self._db.execute("DELETE FROM partial WHERE id = ?", (task_id,))
        self._db.execute("DELETE FROM suspects WHERE id = ?", (task_id,))

    def requeue(
        self,
        task_id: str,
        reason: str | None,
        refund_attempt: bool = False,
        keep_tokens: bool = False,
        suspect: bool = False,
    ) -> None:
        """running -> queued after a failure that was not the task's fault (it will run again);
        ``refund_attempt`` when the run was stopped on purpose (``tilerun down``);
        ``keep_tokens``: the tokens it generated stay (``partial``) for the next run to go on
        from; ``suspect``: it is to run alone from now on (``suspects``)."""
        with self._tx():
            self._db.execute(
                "UPDATE tasks SET state = 'queued', error = ?, prefill_done = 0, generated = 0, "
                "attempts = attempts - ?, updated_at = ? WHERE id = ? AND state = 'running'",
                (reason, 1 if refund_attempt else 0, time.time(), task_id),
            )
            if not keep_tokens:
                self._db.execute("DELETE FROM partial WHERE id = ?", (task_id,))
            if suspect:
                self._db.execute("INSERT OR IGNORE INTO suspects (id) VALUES (?)", (task_id,))

    def suspects(self) -> set[str]:
        """Ids of queued or running tasks marked suspect by ``requeue``."""
        rows = self._db.execute(
            "SELECT s.id FROM suspects s JOIN tasks t ON t.id = s.id "
            "WHERE t.state IN ('queued', 'running')"
        ).fetchall()
        return {r[0] for r in rows}

    # -- retention ---------------------------------------------------------------------------
    def prune(
        self, finished_before: float | None = None, keep: int | None = None, dry_run: bool = False
    ) -> list[str]:
        """Delete finished tasks (done, failed, cancelled) that every given rule lets go: finished
        before ``finished_before`` (a time.time() value), and not among the ``keep`` most recently
        finished. Queued and running tasks are never touched. Returns the ids, oldest first
        (those that would go, with ``dry_run``)."""
        if finished_before is None and keep is None:
            raise ValueError("prune needs finished_before or keep")
        terminal = ",".join(f"'{s}'" for s in TERMINAL)
        q = f"SELECT id FROM tasks WHERE state IN ({terminal})"
        args: list[Any] = []
        if finished_before is not None:
            q += " AND finished_at < ?"
            args.append(finished_before)
        if keep is not None:
            q += (
                f" AND id NOT IN (SELECT id FROM tasks WHERE state IN ({terminal}) "
                "ORDER BY finished_at DESC, n DESC LIMIT ?)"
            )
            args.append(int(keep))
        q += " ORDER BY n"
        with self._tx():
            ids = [r[0] for r in self._db.execute(q, args).fetchall()]
            if ids and not dry_run:
                # in slices: SQLite bounds the number of parameters in one statement
                for i in range(0, len(ids), 500):
                    part = ids[i : i + 500]
                    marks = ",".join("?" * len(part))
                    self._db.execute(
                        f"DELETE FROM tasks WHERE id IN ({marks}) AND state IN ({terminal})", part
                    )
                    self._db.execute(f"DELETE FROM partial WHERE id IN ({marks})", part)
                    self._db.execute(f"DELETE FROM suspects WHERE id IN ({marks})", part)
        return ids


def _task(r: sqlite3.Row) -> Task:
    return Task(
        id=r["id"],
        n=r["n"],
        state=r["state"],
        prompt_text=r["prompt_text"],
        prompt_token_ids=json.loads(r["prompt_token_ids"]),
        params=json.loads(r["params"]),
        attempts=r["attempts"],
        cancel_requested=bool(r["cancel_requested"]),
        prefill_done=r["prefill_done"],
        generated=r["generated"],
        decode_tokens_per_s=r["decode_tokens_per_s"],
        ttft_s=r["ttft_s"],
        output=json.loads(r["output"]) if r["output"] else None,
        error=r["error"],
        submitted_at=r["submitted_at"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
    )
