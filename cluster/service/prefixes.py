"""The service's KV prefix files: a task's prompt KV on disk, so that a re-run skips its prefill.

A task whose prompt has at least ``kv_prefix_min_tokens`` tokens asks its workers to save the
prompt's KV once it is prefilled (``runtime.kv_prefix``: one file per rank, under
``<home>/kv/<task id>.rank<r>.safetensors``). When the task runs again after a worker or engine
death, and every rank's file is there, whole, and made for this prompt by an engine with this
configuration (the ``key``), the new workers read the prompt's rows back instead of computing
them; only the last prompt position is computed, for the first new token. Files go when their
task ends, and at start-up and every ``SWEEP_EVERY_S`` for any task that is no longer queued or
running (a queued task cancelled through the store ends without the engine's loop).

Prefixes are used only where every worker runs on the engine's node: a worker elsewhere would
write its file on another disk, out of the engine's sight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from cluster.service.spec import ServiceSpec
from cluster.service.store import Task
from runtime import kv_prefix

CPU_MIN_TOKENS = 2048  # kv_prefix_min_tokens' default on CPU workers
SWEEP_EVERY_S = 30.0  # a 128K prompt of an 8B model leaves 16 GiB: not kept until a restart


class Prefixes:
    def __init__(self, home: Path, spec: ServiceSpec) -> None:
        self.dir = Path(home) / "kv"
        self.asked = spec.service.kv_prefix_min_tokens
        self.min_tokens = self.asked or 0  # until ``for_device``
        self.enabled = True  # off where a worker is on another node than the engine
        self.tp = spec.engine.cluster.tp
        # the whole configuration: another model, dtype or attention makes other KV
        self._config = json.dumps(spec.to_dict(), sort_keys=True)

    def for_device(self, device_type: str) -> None:
        """Resolve the default against the workers' device: on a CPU a save is a fraction of
        the prefill it spares; on an accelerator, written in the step, it is more."""
        if self.asked is None:
            self.min_tokens = CPU_MIN_TOKENS if device_type == "cpu" else 0

    def stem(self, task_id: str) -> Path:
        # task ids are ours (hex from the store), never a path a user gave
        return self.dir / task_id

    def key(self, prompt_ids: list[int]) -> str:
        h = hashlib.sha256(self._config.encode())
        h.update(json.dumps(list(prompt_ids)).encode())
        return h.hexdigest()

    def whole(self, task: Task, key: str | None = None) -> bool:
        """Every rank's file of ``task`` is there, readable, and for this prompt and config
        (``key``: ``self.key`` of its prompt, where the caller has it)."""
        key = key or self.key(task.prompt_token_ids)
        n = str(len(task.prompt_token_ids))
        for rank in range(self.tp):
            meta = kv_prefix.read_meta(kv_prefix.rank_path(self.stem(task.id), rank))
            if meta is None or (meta.get("key"), meta.get("tokens")) != (key, n):
                return False
            if (meta.get("rank"), meta.get("tp")) != (str(rank), str(self.tp)):
                return False
        return True

    def request(self, task: Task) -> dict[str, Any]:
        """``Engine.add_request``'s prefix arguments for a run of ``task``: restore what an
        earlier run saved, else save where the prompt is long enough, else nothing."""
        if not self.enabled or self.min_tokens <= 0:
            return {}
        if len(task.prompt_token_ids) < max(2, self.min_tokens):
            return {}
        stem, key, n = (
            str(self.stem(task.id)),
            self.key(task.prompt_token_ids),
            len(task.prompt_token_ids),
        )
        if self.whole(task, key):
            return {"restore_prefix": (stem, n)}
        # the prompt's positions, also where a resumed run's prompt goes on with tokens
        return {"save_prefix": (stem, key, n)}

    def remove(self, task_id: str) -> None:
        for path in self.dir.glob(f"{task_id}.rank*.safetensors*"):
            with contextlib.suppress(OSError):
                path.unlink()

    def sweep(self, live: set[str], half_written: bool = True) -> None:
        """Remove the files of every task not in ``live`` (queued or running), and with
        ``half_written`` (at start-up, no worker writing) any file a killed writer left
        half-written."""
        if not self.dir.is_dir():
            return
        for path in self.dir.iterdir():
            task_id = path.name.split(".", 1)[0]
            if task_id not in live or (half_written and path.name.endswith(".tmp")):
                with contextlib.suppress(OSError):
                    path.unlink()
