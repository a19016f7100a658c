"""The service's step loop: queued tasks from the store -> the engine's scheduler -> results.

It runs in a thread of the engine actor. Each turn it admits queued tasks in arrival order while
the scheduler has seats (several in flight share each step's batch), honours cancel requests,
runs one step, and writes progress (at most twice a second) and results to the store.

Durability: when a worker dies (``WorkerDiedError``, raised at once by the executor) or stops
answering (``WorkerStalledError``), the tasks that were running go back to the queue, or are
marked failed once they have had ``max_attempts`` runs, and the workers are built again. When
the engine itself restarts (Ray restarts its actor, or ``tilerun up`` starts a new one), tasks
the store still calls running are treated the same way. Any other failed step (a worker raised)
is treated so too, with two differences: the tasks it ran become suspects, and a prompt KV file
being read is dropped (that run's prompt is computed instead). A task whose second run (or later)
ends in a death, a stall or an engine restart becomes a suspect too. Suspects (kept in the store)
run alone until they end, so a task that makes runs fail ends failed by itself, not with the
tasks that ran beside it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.engine import Engine, _metrics
from cluster.executor import WorkerDiedError, WorkerStalledError
from cluster.service.home import NAMESPACE, WORKER_PREFIX, store_path, write_json
from cluster.service.prefixes import SWEEP_EVERY_S, Prefixes
from cluster.service.spec import ServiceSpec, sampling_from_dict
from cluster.service.store import TaskStore
from runtime.tokenizer import load_tokenizer
from scheduler.errors import TilerunError
from scheduler.request import Sequence

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5
IDLE_POLL_S = 0.1
IDLE_ALIVE_CHECK_S = 1.0  # while idle, how often the workers are checked for a death
SNAPSHOT_FINISHED = 200  # finished tasks a snapshot lists (all queued and running ones too)
TASK_TEXT_CHARS = 100_000  # of a task's text the status page is sent (the end of it)
GIVE_UP_EXIT_CODE = 70  # the engine's process, where its loop cannot recover (EX_SOFTWARE)
EXIT_RECORD = "engine-exit.json"  # why the engine last gave its process up


@dataclass
class _Live:
    """A task the scheduler holds: its store row id, its sequence, when it was submitted."""

    task_id: str
    seq: Sequence
    submitted_at: float
    attempt: int
    started_wall: float
    first_token_wall: float | None = None
    tokens_flushed: int = 0  # output tokens the store's partial row holds
    # tokens an earlier run generated, which this run goes on from (they end its prompt)
    resumed: tuple[int, ...] = ()

    @property
    def tokens(self) -> list[int]:
        """Everything generated for the task: the resumed tokens, then this run's."""
        return [*self.resumed, *self.seq.output_ids]

    @property
    def prompt_len(self) -> int:
        return len(self.seq.prompt_ids) - len(self.resumed)


class ServiceLoop:
    def __init__(
        self,
        spec: ServiceSpec,
        home: Path,
        ray_address: str = "",
        restarts: int = 0,
        last_restart: str | None = None,
    ) -> None:
        """``restarts``: how many times Ray has restarted the engine actor this loop runs in
        (shown by ``tilerun status``); ``last_restart``: why the one before went."""
        self.spec = spec
        self.restarts = restarts
        self.last_restart = last_restart  # why the engine before this one went, where known
        self.home = home
        self.ray_address = ray_address
        self.started_at = time.time()
        self.store = TaskStore(store_path(home))
        self.prefixes = Prefixes(home, spec)  # tasks' prompt KV on disk, for their re-runs
        self.engine: Engine | None = None
        self.tokenizer = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._live: dict[int, _Live] = {}  # seq_id -> task
        self._suspects: set[str] = set()  # the store's suspects: each runs alone
        self._workers: list[dict] = []
        self._memory: list[dict] = []
        self._throughput: collections.deque = collections.deque(maxlen=600)
        self._window = [time.time(), 0, 0]  # start, prefill tokens, decode tokens
        self._last_progress = 0.0
        self._last_cancel_check = 0.0
        self._last_sweep = time.monotonic()  # (start-up sweeps on its own)
        self._last_alive_check = 0.0
        self.rebuilds = 0
        self._allreduce_exposed_s = 0.0  # rank 0's steps, since the engine started
        self._readers = threading.local()
        self.thread = threading.Thread(target=self._main, name="tilerun-step-loop", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop after the current step; running tasks go back to the queue, their attempt not
        counted (nothing failed), to resume on the next ``tilerun up``."""
        self.stopping.set()
        self.thread.join(timeout)
        with self._lock:
            live, self._live = list(self._live.values()), {}
        for t in live:
            self.store.requeue(t.task_id, None, refund_attempt=True)
        if self.engine is not None:
            if not self.thread.is_alive():  # else the loop still owns the steps in flight
                self.engine.steps.abandon()
            self.engine.shutdown()
            self.engine = None

    def _main(self) -> None:
        try:
            self._build()
            self._recover_after_restart()
        except BaseException as e:  # noqa: BLE001 - reported through ready()
            log.exception("engine bring-up failed")
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        self._serve()

    def _serve(self) -> None:
        """Turns until stopped. A failed turn costs its tasks an attempt and the workers a
        rebuild; where that recovery fails too (the store cannot be written, say), the loop
        cannot go on, and a loop thread that ended would leave the engine answering with no
        task moving: the process exits (``_give_up``), and Ray starts the engine again
        (``engine_restarts``), which requeues the running tasks from the store."""
        while not self.stopping.is_set():
            try:
                try:
                    self._turn()
                except (WorkerDiedError, WorkerStalledError) as e:
                    log.warning("%s; rebuilding the workers", e)
                    self._on_worker_death(str(e))
                except Exception as e:  # noqa: BLE001 - a failed step costs its tasks an attempt
                    log.exception("step failed; its tasks run again, each alone")
                    self._on_step_failure(f"{type(e).__name__}: {e}")
            except BaseException as e:  # noqa: BLE001 - the recovery itself failed
                if self.stopping.is_set():  # stop() is taking the engine down under this turn
                    log.warning("a turn failed while the loop stopped", exc_info=True)
                    return
                log.exception("recovering from a failed step failed; the engine exits to restart")
                self._give_up(f"recovering from a failed step failed: {type(e).__name__}: {e}")
                return

    def _give_up(self, reason: str) -> None:
        """End this process for Ray to restart it; ``reason`` goes to ``engine-exit.json`` for
        the next engine to show (``last_restart``), where the disk still takes it."""
        with contextlib.suppress(OSError):
            write_json(self.home, EXIT_RECORD, {"at": time.time(), "reason": reason})
        for handler in logging.getLogger().handlers:  # the reason reaches the engine's log
            handler.flush()
        os._exit(GIVE_UP_EXIT_CODE)

    def _build(self) -> None:
        opts = {"actor_name_prefix": WORKER_PREFIX, "namespace": NAMESPACE, "long_lived": True}
        deadline = time.monotonic() + 60
        while True:
            try:
                self.engine = Engine(self.spec.engine, executor_options=opts)
                break
            except ValueError as e:
                # a killed worker's name is released a moment after it dies
                if "already taken" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        self.tokenizer = load_tokenizer(self.engine.checkpoint)
        import ray

        where = ray.get([w.where.remote() for w in self.engine.executor.workers])
        self.prefixes.for_device(self.engine.device_infos[0]["device"].split(":")[0])
        # a worker on another node writes its file on that node's disk, out of the engine's
        # sight, and could not read one written here: no prefixes then
        here = ray.get_runtime_context().get_node_id()
        self.prefixes.enabled = all(w["node"] == here for w in where)
        self._workers = [
            {**info, **w, "name": f"{WORKER_PREFIX}{info['rank']}"}
            for info, w in zip(self.engine.device_infos, where)
        ]
        self._memory = self.engine.executor.memory_stats()

    def describe(self, e: Engine | None = None) -> dict[str, Any]:
        """What ``tilerun up`` records in engine.json: what submit checks tasks against
        (``e``: the engine to describe, else the running one)."""
        e = e or self.engine
        assert e is not None
        return {
            "config": self.spec.to_dict(),
            "max_model_len": e.max_model_len,
            "num_blocks": e.executor.num_blocks,
            "block_size": self.spec.engine.scheduler.block_size,
            "prefill_chunk": e.config.scheduler.prefill_chunk,  # as resolved for the device
            "vocab_size": e.model_config.vocab_size,
            "checkpoint": str(e.checkpoint) if e.checkpoint else None,
            "devices": e.device_infos,
            # how each step reaches the workers, as step_transport=auto chose it
            "step_transport": getattr(e.executor, "step_transport", None),
            "started_at": self.started_at,
            "restarts": self.restarts,
        }

    # -- recovery ----------------------------------------------------------------------------
    def _recover_after_restart(self) -> None:
        for t in self.store.list(("running",)):
            self._retry_or_fail(
                t.id, t.attempts, "the engine restarted while the task ran", t.attempts >= 2
            )
        self._suspects = self.store.suspects()
        self.prefixes.sweep({t.id for t in self.store.list(("queued", "running"))})

    def _retry_or_fail(self, task_id: str, attempts: int, reason: str, suspect: bool) -> None:
        """Back to the queue (``suspect``: to run alone), or failed after ``max_attempts``."""
        if attempts >= self.spec.service.max_attempts:
            self._end(task_id, "failed", error=f"{reason}; gave up after {attempts} attempt(s)")
        else:  # its tokens stay: the next run goes on from them
            self.store.requeue(task_id, reason, keep_tokens=True, suspect=suspect)
            if suspect:
                self._suspects.add(task_id)

    def _end(self, task_id: str, state: str, **outcome) -> None:
        """A task's last state in the store (``TaskStore.finish``); its prefix files and its
        suspect mark go with it."""
        self.store.finish(task_id, state, **outcome)
        self.prefixes.remove(task_id)
        self._suspects.discard(task_id)

    def _on_worker_death(self, reason: str, suspects: bool = False) -> None:
        """The running tasks go back to the queue (``suspects``: all as suspects, else those
        whose second run or later this was) and the workers are built again."""
        with self._lock:
            live, self._live = list(self._live.values()), {}
        for t in live:
            self._retry_or_fail(t.task_id, t.attempt, reason, suspects or t.attempt >= 2)
        assert self.engine is not None
        self.engine.steps.abandon()
        self.engine.scheduler.abort_all()
        self.engine.shutdown()
        self.engine = None
        while not self.stopping.is_set():
            try:
                self._build()
                self.rebuilds += 1
                return
            except Exception:  # noqa: BLE001 - keep trying: the tasks wait in the store
                log.exception("rebuilding the workers failed; trying again in 5 s")
                time.sleep(5)

    def _on_step_failure(self, reason: str) -> None:
        """A step raised (not a death or a stall): its tasks go back to the queue as suspects,
        each to run alone (``_admit``), and the workers are built again, their state unknown.
        A prompt KV file that a task was reading is removed: its next run computes the prompt."""
        with self._lock:
            live = list(self._live.values())
        for t in live:
            if t.seq.restore_prefix is not None:
                self.prefixes.remove(t.task_id)
        self._on_worker_death(reason, suspects=True)

    # -- one turn ----------------------------------------------------------------------------
    def _turn(self) -> None:
        engine = self.engine
        assert engine is not None
        self._admit(engine)
        now = time.monotonic()
        if now - self._last_cancel_check > 0.2:
            self._last_cancel_check = now
            self._cancel(engine)
        if now - self._last_sweep > SWEEP_EVERY_S:
            self._last_sweep = now
            self.prefixes.sweep(
                {t.id for t in self.store.list(("queued", "running"))}, half_written=False
            )
        if not engine.steps.has_work:
            self._flush_progress(force=True)
            if now - self._last_alive_check >= IDLE_ALIVE_CHECK_S:
                self._last_alive_check = now
                check = getattr(engine.executor, "check_alive", None)  # Ray's workers only
                if check is not None:
                    check()  # a death or a stall rebuilds them now (_main), with no task lost
            self.stopping.wait(IDLE_POLL_S)
            return
        # the engine's step loop: with overlap on, the next step is already running on the
        # workers while this turn writes progress and results
        taken = engine.steps.advance()
        if taken is None:
            self.stopping.wait(IDLE_POLL_S)
            return
        for step in taken:
            self._took(engine, step)
        self._sample_throughput()
        self._flush_progress()

    def _took(self, engine: Engine, step) -> None:
        """Account for one step that came back (``cluster.step_loop.StepDone``)."""
        batch = step.batch
        self._allreduce_exposed_s += getattr(step.result, "allreduce_exposed_s", 0.0)
        wall = time.time()
        prefill_tokens = sum(
            len(c.token_ids)
            for c in batch.chunks
            if c.start_pos < self._prompt_len(c.seq_id) and c.kv_prefix is None
        )
        restored = sum(len(c.token_ids) for c in batch.chunks if c.kv_prefix is not None)
        self._window[1] += prefill_tokens  # computed: rows read from a prefix file are not
        self._window[2] += batch.num_tokens - prefill_tokens - restored
        with self._lock:
            for c in batch.chunks:
                t = self._live.get(c.seq_id)
                if t and t.first_token_wall is None and t.seq.output_ids:
                    t.first_token_wall = wall
        for seq in step.finished:
            self._finish(engine, seq)

    def _prompt_len(self, seq_id: int) -> int:
        t = self._live.get(seq_id)
        return len(t.seq.prompt_ids) if t else 0

    def _admit(self, engine: Engine) -> None:
        sched = engine.scheduler
        seats = engine.config.scheduler.max_num_seqs - len(sched.running) - len(sched.waiting)
        if seats <= 0 or sched.waiting:
            return
        with self._lock:
            live = {t.task_id for t in self._live.values()}
        if live & self._suspects:
            return  # a suspect runs alone
        for task in self.store.list(("queued",), limit=seats):
            if task.id in self._suspects:
                if live:
                    return  # it waits for the tasks ahead of it to end, and so do those behind
                seats = 0  # admitted below, alone
            elif seats <= 0:
                return
            live.add(task.id)
            attempt = self.store.start(task.id)
            try:
                params = sampling_from_dict(task.params)
                resumed = self._resumable(engine, task, params) if attempt > 1 else []
                if resumed:  # the prompt and the tokens so far are the new run's prompt
                    params = dataclasses.replace(
                        params, max_new_tokens=params.max_new_tokens - len(resumed)
                    )
                # checks the vocabulary and that it fits, as submit did against engine.json
                seq = engine.add_request(
                    [*task.prompt_token_ids, *resumed], params, **self.prefixes.request(task)
                )
                seq.skip_draws = len(resumed)
            except TilerunError as e:
                self._end(task.id, "failed", error=str(e))
                live.discard(task.id)
                continue
            except Exception as e:  # noqa: BLE001 - never left running with no run behind it
                log.exception("admitting task %s failed", task.id)
                self._retry_or_fail(task.id, attempt, f"{type(e).__name__}: {e}", True)
                live.discard(task.id)
                continue
            with self._lock:
                self._live[seq.seq_id] = _Live(
                    task.id, seq, task.submitted_at, attempt, started_wall=time.time(),
                    resumed=tuple(resumed),
                )  # fmt: skip

    def _resumable(self, engine: Engine, task, params) -> list[int]:
        """The tokens an earlier run of ``task`` generated (as last stored, twice a second) that
        a new run can go on from: up to the first stop token, at most ``max_new_tokens`` - 1
        (the new run samples at least one)."""
        got = self.store.partial(task.id)
        if not got:
            return []
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop |= set(engine.model_config.eos_token_ids)
        tokens = got[1][: max(0, params.max_new_tokens - 1)]
        for i, tok in enumerate(tokens):
            if tok in stop:
                return tokens[:i]
        return tokens

    def _cancel(self, engine: Engine) -> None:
        with self._lock:
            by_task = {t.task_id: sid for sid, t in self._live.items()}
        if not by_task:
            return
        for task in self.store.list(("running",)):
            if task.cancel_requested and task.id in by_task:
                sid = by_task[task.id]
                engine.scheduler.abort(sid)
                with self._lock:
                    self._live.pop(sid, None)
                self._end(task.id, "cancelled", error="cancelled by the user")

    def _finish(self, engine: Engine, seq: Sequence) -> None:
        with self._lock:
            t = self._live.pop(seq.seq_id, None)
        if t is None:
            return
        peak = max(m["peak_bytes"] for m in engine.executor.memory_stats())
        metrics = _metrics(seq, peak)
        # a resumed run's prompt ends with the tokens it went on from: count them as generated
        metrics["prompt_tokens"] = t.prompt_len
        metrics["generated_tokens"] = len(t.tokens)
        metrics["resumed_tokens"] = len(t.resumed)
        now = time.time()
        metrics["queue_s"] = t.started_wall - t.submitted_at
        metrics["submit_to_first_token_s"] = (t.first_token_wall or now) - t.submitted_at
        metrics["attempts"] = t.attempt
        output = {
            "token_ids": t.tokens,
            "text": self.tokenizer.decode(t.tokens) if self.tokenizer else None,
            "finish_reason": seq.finish_reason,
            "metrics": metrics,
            "devices": engine.device_infos,
            "wall_s": now - t.submitted_at,
        }
        self._end(t.task_id, "done", output=output)

    def _flush_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        with self._lock:
            live = list(self._live.values())
        tokens = {}  # what `tilerun result --follow` reads: only where more were generated
        for t in live:
            n = len(t.resumed) + len(t.seq.output_ids)
            if n > t.tokens_flushed:
                tokens[t.task_id] = (t.attempt, t.tokens)
                t.tokens_flushed = n
        self.store.progress([_progress(t) for t in live], tokens)

    def _sample_throughput(self) -> None:
        now = time.time()
        start, pre, dec = self._window
        if now - start >= 1.0:
            dt = now - start
            self._throughput.append(
                {"t": now, "prefill_tokens_per_s": pre / dt, "decode_tokens_per_s": dec / dt}
            )
            self._window = [now, 0, 0]
            if self.engine is not None:
                self._memory = self.engine.executor.memory_stats()

    # -- what the status page and `tilerun status` show ----------------------------------------
    def _reader(self) -> TaskStore:
        """This thread's own connection: snapshots come from the actor's, the status page's and
        the metrics pump's threads, and a SQLite connection is not for sharing across threads."""
        store = getattr(self._readers, "store", None)
        if store is None:
            store = self._readers.store = TaskStore(self.store.path)
        return store

    def task_view(self, task_id: str) -> dict[str, Any] | None:
        """One task for the status page (``/api/task``): its snapshot row and its text so far,
        the output's once done, else its current attempt's tokens as last stored (twice a
        second), decoded; the last ``TASK_TEXT_CHARS`` characters. None for an unknown id."""
        store = self._reader()
        t = store.get(task_id)
        if t is None:
            return None
        d = t.summary()
        if t.output is not None:
            text, n = t.output.get("text") or "", len(t.output["token_ids"])
        else:
            got = store.partial(t.id)
            tokens = got[1] if got else []
            text = self.tokenizer.decode(tokens) if tokens and self.tokenizer else ""
            n = len(tokens)
        d |= {"text": text[-TASK_TEXT_CHARS:], "text_truncated": len(text) > TASK_TEXT_CHARS}
        d["text_tokens"] = n
        return d

    def snapshot(self) -> dict[str, Any]:
        # read before the workers: ``_build`` records new workers before it counts the rebuild,
        # so a count that says rebuilt comes with the new workers' pids, never the dead ones'
        rebuilds = self.rebuilds
        e = self.engine
        blocks = e.scheduler.blocks if e else None
        tiers = getattr(e.scheduler, "tiers", None) if e else None  # the two-tier scheduler
        if tiers is not None:
            size = {"device": tiers.device_blocks, "host": tiers.host_blocks}
            used = {
                "device": tiers.device_blocks - tiers.num_free_device,
                "host": tiers.host_blocks - tiers.num_free_host,
            }
        else:
            size = {"device": blocks.num_blocks if blocks else 0, "host": 0}
            used = {"device": (blocks.num_blocks - blocks.num_free) if blocks else 0, "host": 0}
        workers = []
        for w, m in zip(self._workers, self._memory or [{}] * len(self._workers)):
            workers.append(
                {
                    "rank": w["rank"],
                    "node": w.get("node", ""),
                    "device": w["device"],
                    "name": w["name"],
                    "pid": w.get("pid"),
                    "memory_bytes": m.get("kv_cache_bytes", 0),
                    "peak_memory_bytes": m.get("peak_bytes", 0),
                    "kv_blocks": dict(size),
                    "kv_used": dict(used),
                }
            )
        with self._lock:
            live = {t.task_id: t for t in self._live.values()}
        suspects = set(self._suspects)
        tasks = []
        for task in self._reader().recent(SNAPSHOT_FINISHED):
            d = task.summary()
            d["alone"] = task.id in suspects  # a suspect: runs with no other task beside it
            t = live.get(task.id)
            if t is not None:
                _, d["prefill_done"], d["generated"], d["decode_tokens_per_s"], d["ttft_s"] = (
                    _progress(t)
                )
                d["context_len"] = d["prefill_total"] + d["generated"]
            tasks.append(d)
        return {
            "engine": {
                "started_at": self.started_at,
                "model": self.spec.engine.worker.model,
                "tp": self.spec.engine.cluster.tp,
                "ray_address": self.ray_address,
                "home": str(self.home),
                "pid": os.getpid(),
                "ready": self.ready.is_set() and self.error is None,
                # a bring-up that failed (after a restart no `tilerun up` is there to say it)
                "error": None
                if self.error is None
                else f"{type(self.error).__name__}: {self.error}",
                "rebuilds": rebuilds,
                "restarts": self.restarts,
                "last_restart": self.last_restart,
            },
            "workers": workers,
            "tasks": tasks,
            "throughput": list(self._throughput),
            "counters": self._counters(e),
        }

    def _counters(self, e) -> dict[str, Any]:
        """Totals since the engine started: KV bytes spilled to and fetched from the host tier
        (all ranks), and the time rank 0's steps waited on AllReduce (not hidden by compute)."""
        stats = getattr(e.scheduler, "stats", None) if e else None
        out = {"bytes_spilled": 0, "bytes_prefetched": 0}
        out["allreduce_exposed_s"] = self._allreduce_exposed_s
        if stats is None:
            return out
        c, bs = e.model.config, e.config.scheduler.block_size
        elem = {"float32": 4}.get(str(e.device_infos[0].get("dtype")), 2)
        block = 2 * c.num_kv_layers * bs * c.num_key_value_heads * c.head_dim * elem
        out["bytes_spilled"] = stats.blocks_spilled * block
        out["bytes_prefetched"] = stats.blocks_fetched * block
        return out


def _progress(t: _Live) -> tuple[str, int, int, float | None, float | None]:
    s = t.seq
    n_run = len(s.output_ids)  # this run's: the rate is theirs
    tps = None
    if n_run > 1 and s.first_token_time is not None:
        dt = time.perf_counter() - s.first_token_time
        tps = (n_run - 1) / dt if dt > 0 else None
    ttft = (s.first_token_time - s.arrival_time) if s.first_token_time else None
    return (t.task_id, min(s.num_computed, t.prompt_len), len(t.resumed) + n_run, tps, ttft)
