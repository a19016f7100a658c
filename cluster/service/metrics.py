"""tilerun's service metrics on Ray's metrics API, scraped from Ray's Prometheus endpoint.

``ServiceMetrics().record(snapshot)`` turns one engine snapshot (the schema in the README's
"Watching") into ``ray.util.metrics`` values. Ray's metrics agent on each node exports them in
Prometheus text on the node's metrics export port (``ray_`` prefixed, with Ray's own labels such
as ``SessionName`` and ``NodeAddress`` added), where Prometheus and Grafana read them. Create it
in a process connected to Ray (the engine actor).

Ray forgets a gauge within about half a minute of its last set (seen with Ray 2.60), so an idle
engine must keep recording: :meth:`ServiceMetrics.start` records ``snapshot_fn()`` every few
seconds from a daemon thread. Ray exports a histogram's ``_sum`` from bucket midpoints, so read
time to first token from its buckets and ``_count``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

from ray.util.metrics import Counter, Gauge, Histogram

TASK_STATES = ("queued", "running", "done", "failed", "cancelled")
KV_TIERS = ("device", "host")
# Time to first token spans milliseconds (short prompts) to minutes (long contexts on few devices).
TTFT_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800]

log = logging.getLogger(__name__)

# name -> help text: the README's table is this dict.
METRICS = {
    "tilerun_prefill_tokens_per_second": "prompt tokens prefilled per second (latest sample)",
    "tilerun_decode_tokens_per_second": "tokens generated per second (latest sample)",
    "tilerun_time_to_first_token_seconds": "histogram of time from submit to first token, per task",
    "tilerun_queue_length": "tasks waiting for the engine",
    "tilerun_tasks": "tasks by state (label state)",
    "tilerun_kv_blocks": "KV cache blocks per rank and tier (labels rank, tier)",
    "tilerun_kv_blocks_used": "KV cache blocks in use per rank and tier (labels rank, tier)",
    "tilerun_kv_spilled_bytes": "KV bytes spilled from device to host (counter)",
    "tilerun_kv_prefetched_bytes": "KV bytes prefetched from host to device (counter)",
    "tilerun_allreduce_exposed_seconds": "AllReduce time not hidden behind compute (counter)",
    "tilerun_device_memory_bytes": "device memory in use per rank (label rank)",
    "tilerun_device_peak_memory_bytes": "peak device memory per rank (label rank)",
    "tilerun_engine_restarts": "times Ray restarted the engine after its process died",
    "tilerun_worker_rebuilds": "times the running engine rebuilt dead workers",
}


class ServiceMetrics:
    """The service's Ray metrics; ``record`` is cheap enough to call on every snapshot."""

    def __init__(self) -> None:
        m = METRICS
        self.prefill_tps = Gauge(
            "tilerun_prefill_tokens_per_second", m["tilerun_prefill_tokens_per_second"]
        )
        self.decode_tps = Gauge(
            "tilerun_decode_tokens_per_second", m["tilerun_decode_tokens_per_second"]
        )
        self.ttft = Histogram(
            "tilerun_time_to_first_token_seconds",
            m["tilerun_time_to_first_token_seconds"],
            boundaries=TTFT_BOUNDARIES_S,
        )
        self.queue_length = Gauge("tilerun_queue_length", m["tilerun_queue_length"])
        self.tasks = Gauge("tilerun_tasks", m["tilerun_tasks"], tag_keys=("state",))
        self.kv_blocks = Gauge(
            "tilerun_kv_blocks", m["tilerun_kv_blocks"], tag_keys=("rank", "tier")
        )
        self.kv_used = Gauge(
            "tilerun_kv_blocks_used", m["tilerun_kv_blocks_used"], tag_keys=("rank", "tier")
        )
        self.spilled = Counter("tilerun_kv_spilled_bytes", m["tilerun_kv_spilled_bytes"])
        self.prefetched = Counter("tilerun_kv_prefetched_bytes", m["tilerun_kv_prefetched_bytes"])
        self.allreduce = Counter(
            "tilerun_allreduce_exposed_seconds", m["tilerun_allreduce_exposed_seconds"]
        )
        self.memory = Gauge(
            "tilerun_device_memory_bytes", m["tilerun_device_memory_bytes"], tag_keys=("rank",)
        )
        self.peak_memory = Gauge(
            "tilerun_device_peak_memory_bytes",
            m["tilerun_device_peak_memory_bytes"],
            tag_keys=("rank",),
        )
        # gauges, not counters: each restart begins a new process, which knows its count
        self.restarts = Gauge("tilerun_engine_restarts", m["tilerun_engine_restarts"])
        self.rebuilds = Gauge("tilerun_worker_rebuilds", m["tilerun_worker_rebuilds"])
        # The snapshot's counters are cumulative; Ray's Counter takes increments.
        self._last_counters: dict[str, float] = {}
        self._ttft_seen: set[str] = set()
        self._lock = threading.Lock()  # record() from the pump and from callers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, snapshot_fn: Callable[[], dict], interval_s: float = 5.0) -> None:
        """Record ``snapshot_fn()`` every ``interval_s`` from a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()

        def pump() -> None:
            while not self._stop.is_set():
                try:
                    self.record(snapshot_fn())
                except Exception as e:  # a failed snapshot skips one sample, not the exporter
                    log.warning("tilerun metrics: snapshot failed: %s", e)
                self._stop.wait(interval_s)

        self._thread = threading.Thread(target=pump, name="tilerun-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def record(self, snapshot: dict) -> None:
        """Export one snapshot: gauges take its values, counters its increase, TTFT new tasks."""
        with self._lock:
            self._record(snapshot)

    def _record(self, snapshot: dict) -> None:
        tput = (snapshot.get("throughput") or [{}])[-1]
        _set(self.prefill_tps, tput.get("prefill_tokens_per_s"))
        _set(self.decode_tps, tput.get("decode_tokens_per_s"))

        engine = snapshot.get("engine") or {}
        _set(self.restarts, engine.get("restarts", 0))
        _set(self.rebuilds, engine.get("rebuilds", 0))

        tasks = snapshot.get("tasks") or []
        counts = dict.fromkeys(TASK_STATES, 0)
        for t in tasks:
            counts[t.get("state", "queued")] = counts.get(t.get("state", "queued"), 0) + 1
        for state, n in counts.items():
            self.tasks.set(n, tags={"state": state})
        self.queue_length.set(counts["queued"])

        seen_now = set()
        for t in tasks:
            tid, ttft = str(t.get("id")), t.get("ttft_s")
            seen_now.add(tid)
            if _finite(ttft) and tid not in self._ttft_seen:
                self.ttft.observe(float(ttft))
                self._ttft_seen.add(tid)
        self._ttft_seen &= seen_now  # bounded by the snapshot's task list

        for w in snapshot.get("workers") or []:
            rank = str(w.get("rank"))
            for tier in KV_TIERS:
                tags = {"rank": rank, "tier": tier}
                _set(self.kv_blocks, (w.get("kv_blocks") or {}).get(tier, 0), tags)
                _set(self.kv_used, (w.get("kv_used") or {}).get(tier, 0), tags)
            _set(self.memory, w.get("memory_bytes"), {"rank": rank})
            _set(self.peak_memory, w.get("peak_memory_bytes"), {"rank": rank})

        counters = snapshot.get("counters") or {}
        self._advance(self.spilled, "bytes_spilled", counters)
        self._advance(self.prefetched, "bytes_prefetched", counters)
        self._advance(self.allreduce, "allreduce_exposed_s", counters)

    def _advance(self, counter: Counter, key: str, counters: dict) -> None:
        value = counters.get(key)
        if not _finite(value):
            return
        last = self._last_counters.get(key, 0.0)
        # A smaller value means the engine restarted its count: all of it is new.
        delta = value - last if value >= last else value
        self._last_counters[key] = float(value)
        if delta > 0:
            counter.inc(float(delta))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _set(gauge: Gauge, value, tags: dict | None = None) -> None:
    if _finite(value):
        gauge.set(float(value), tags=tags)
