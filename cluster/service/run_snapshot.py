"""A status-page snapshot of prompts run one after another through an in-process ``LLM``.

The service's engine actor builds the real snapshot; this builds the same schema from the public
one-shot path (``LLM.generate`` and its progress callback), so the status page can watch a
``tilerun run``-style job, and so the page's browser test and the README screenshot come from a
real run. Each submitted prompt is one task; tasks run in submission order on the calling thread
of :meth:`RunSnapshot.run`, and :meth:`RunSnapshot.snapshot` may be read from any thread.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cluster.api import LLM
from cluster.engine import Progress
from scheduler.request import SamplingParams

SAMPLE_EVERY_S = 0.25  # one throughput point per quarter second keeps the plot smooth and short


@dataclass
class _Task:
    id: str
    prompt: list[int]
    params: SamplingParams
    submitted_at: float
    state: str = "queued"
    prefill_done: int = 0
    generated: int = 0
    decode_tokens_per_s: float | None = None
    ttft_s: float | None = None
    attempts: int = 0
    error: str | None = None
    finished_at: float | None = None
    text: str = ""  # the output's, once done (a one-shot run reports no tokens before)

    def view(self) -> dict:
        return {
            "id": self.id,
            "state": self.state,
            "prefill_done": self.prefill_done,
            "prefill_total": len(self.prompt),
            "generated": self.generated,
            "max_new_tokens": self.params.max_new_tokens,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "ttft_s": self.ttft_s,
            "context_len": len(self.prompt) + self.generated,
            "attempts": self.attempts,
            "error": self.error,
            "submitted_at": self.submitted_at,
            "finished_at": self.finished_at,
        }


class RunSnapshot:
    """Run submitted prompts on ``llm`` and keep the snapshot the status page shows."""

    def __init__(
        self,
        llm: LLM,
        history: int = 600,
        sample_every_s: float = SAMPLE_EVERY_S,
        on_step: Callable[[str, Progress], None] | None = None,
    ) -> None:
        """``on_step(task_id, progress)`` runs after each engine step, on the generating thread."""
        self.llm = llm
        self.sample_every_s = sample_every_s
        self.on_step = on_step
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._tasks: list[_Task] = []
        self._throughput: deque[dict] = deque(maxlen=history)
        self._workers = self._read_workers()

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None) -> str:
        ids = self.llm.encode(prompt) if isinstance(prompt, str) else list(prompt)
        with self._lock:
            task = _Task(f"t{len(self._tasks) + 1}", ids, params or SamplingParams(), time.time())
            self._tasks.append(task)
        return task.id

    def run(self) -> None:
        """Run every queued task, in order, until none is left (blocking)."""
        while True:
            with self._lock:
                task = next((t for t in self._tasks if t.state == "queued"), None)
                if task is None:
                    return
                task.state, task.attempts = "running", task.attempts + 1
            self._run_one(task)

    def _run_one(self, task: _Task) -> None:
        last = {"t": time.perf_counter(), "prefill": 0, "generated": 0}
        acc = {"prefill": 0, "generated": 0}

        def on_progress(p: Progress) -> None:
            # Runs on the generating thread between steps: the engine's state is consistent here.
            now = time.perf_counter()
            acc["prefill"] += p.prefill_done - last["prefill"]
            acc["generated"] += p.generated - last["generated"]
            last["prefill"], last["generated"] = p.prefill_done, p.generated
            sample, dt = None, now - last["t"]
            if dt >= self.sample_every_s:
                sample = {
                    "t": time.time(),
                    "prefill_tokens_per_s": acc["prefill"] / dt,
                    "decode_tokens_per_s": acc["generated"] / dt,
                }
                acc["prefill"] = acc["generated"] = 0
                last["t"] = now
            workers = self._read_workers() if sample else None  # an RPC per worker: not locked
            with self._lock:
                task.prefill_done, task.generated = p.prefill_done, p.generated
                if sample:
                    self._throughput.append(sample)
                    self._workers = workers
            if self.on_step is not None:
                self.on_step(task.id, p)

        try:
            out = self.llm.generate([task.prompt], task.params, on_progress=on_progress)[0]
        except Exception as e:
            with self._lock:
                task.state, task.error, task.finished_at = "failed", str(e), time.time()
            return
        workers = self._read_workers()
        with self._lock:
            task.state, task.finished_at = "done", time.time()
            task.text = out.text or ""
            task.generated = len(out.token_ids)
            task.prefill_done = len(task.prompt)
            task.ttft_s = out.metrics.get("ttft_s")
            task.decode_tokens_per_s = out.metrics.get("decode_tokens_per_s")
            self._workers = workers

    def task_view(self, task_id: str) -> dict | None:
        """One task for the status page's ``/api/task``: its row and its text (once done)."""
        with self._lock:
            t = next((t for t in self._tasks if t.id == task_id), None)
            return None if t is None else {**t.view(), "text": t.text}

    def _read_workers(self) -> list[dict]:
        engine = self.llm.engine
        blocks = engine.scheduler.blocks
        stats = {m["rank"]: m for m in engine.executor.memory_stats()}
        workers = []
        for info in engine.device_infos:
            mem = stats.get(info["rank"], {})
            workers.append(
                {
                    "rank": info["rank"],
                    "node": info.get("node") or socket.gethostname(),
                    "device": info["device"],
                    "name": info.get("name", ""),
                    # The one-shot path reports the worker's peak (torch's, or RSS on CPU).
                    "memory_bytes": mem.get("peak_bytes", 0),
                    "peak_memory_bytes": mem.get("peak_bytes", 0),
                    "kv_blocks": {"device": blocks.num_blocks, "host": 0},
                    "kv_used": {"device": blocks.num_blocks - blocks.num_free, "host": 0},
                }
            )
        return workers

    def snapshot(self) -> dict:
        """The snapshot schema the status page and metrics read (README, "Watching"), plain JSON."""
        cfg = self.llm.config.to_dict()  # the flat user-facing fields
        with self._lock:
            return {
                "engine": {
                    "started_at": self.started_at,
                    "model": cfg["model"],
                    "tp": cfg["tp"],
                    "ray_address": _ray_address(),
                    "home": "",
                },
                "workers": [dict(w) for w in self._workers],
                "tasks": [t.view() for t in self._tasks],
                "throughput": list(self._throughput),
                "counters": {"bytes_spilled": 0, "bytes_prefetched": 0, "allreduce_exposed_s": 0.0},
            }


def _ray_address() -> str:
    try:
        import ray

        return ray.get_runtime_context().gcs_address if ray.is_initialized() else ""
    except Exception:
        return ""
