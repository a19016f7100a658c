"""ServiceMetrics through Ray's real metrics pipeline: an actor records, Prometheus text shows it."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from cluster.service.metrics import METRICS

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _parse(text: str) -> list[tuple[str, dict, float]]:
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and not line.startswith("#"):
            out.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
    return out


def _snapshot(spilled: int, allreduce_s: float, t2_state: str) -> dict:
    return {
        "engine": {"started_at": 0.0, "model": "tiny", "tp": 2, "ray_address": "", "home": "",
                   "restarts": 3, "rebuilds": 1},
        "workers": [
            {"rank": r, "node": "n", "device": f"cpu:{r}", "name": "cpu",
             "memory_bytes": 1000 + r, "peak_memory_bytes": 5000 + r,
             "kv_blocks": {"device": 256, "host": 1024}, "kv_used": {"device": 17 + r, "host": 3}}
            for r in (0, 1)
        ],
        "tasks": [
            {"id": "t1", "state": "done", "ttft_s": 0.375},
            {"id": "t2", "state": t2_state, "ttft_s": 4.0 if t2_state == "done" else None},
            {"id": "t3", "state": "queued", "ttft_s": None},
            {"id": "t4", "state": "queued", "ttft_s": None},
        ],
        "throughput": [
            {"t": 1.0, "prefill_tokens_per_s": 1.0, "decode_tokens_per_s": 1.0},
            {"t": 2.0, "prefill_tokens_per_s": 4321.5, "decode_tokens_per_s": 87.25},
        ],
        "counters": {"bytes_spilled": spilled, "bytes_prefetched": 2048,
                     "allreduce_exposed_s": allreduce_s},
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.ray
def test_an_actors_snapshot_reaches_rays_prometheus_endpoint(ray_cluster):
    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class Recorder:
        def __init__(self) -> None:
            from cluster.service.metrics import ServiceMetrics

            self.metrics = ServiceMetrics()

        def record(self, snapshot: dict) -> str:
            import ray

            self.metrics.record(snapshot)
            return ray.get_runtime_context().get_worker_id()

        def keep_recording(self, snapshot: dict) -> None:
            # Ray drops gauges that are not set again for ~20 s: the pump keeps them fresh.
            self.metrics.start(lambda: snapshot, interval_s=1.0)

    rec = Recorder.remote()
    ray.get(rec.record.remote(_snapshot(4096, 0.25, "running")))
    # Counters are cumulative in the snapshot: the second one adds only the increase.
    worker_id = ray.get(rec.record.remote(_snapshot(6144, 0.75, "done")))
    ray.get(rec.keep_recording.remote(_snapshot(6144, 0.75, "done")))

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    want = {
        ("ray_tilerun_prefill_tokens_per_second", ()): 4321.5,
        ("ray_tilerun_decode_tokens_per_second", ()): 87.25,
        ("ray_tilerun_queue_length", ()): 2,
        ("ray_tilerun_tasks", (("state", "queued"),)): 2,
        ("ray_tilerun_tasks", (("state", "running"),)): 0,
        ("ray_tilerun_tasks", (("state", "done"),)): 2,
        ("ray_tilerun_tasks", (("state", "failed"),)): 0,
        ("ray_tilerun_kv_blocks", (("rank", "1"), ("tier", "device"))): 256,
        ("ray_tilerun_kv_blocks", (("rank", "0"), ("tier", "host"))): 1024,
        ("ray_tilerun_kv_blocks_used", (("rank", "1"), ("tier", "device"))): 18,
        ("ray_tilerun_kv_blocks_used", (("rank", "0"), ("tier", "host"))): 3,
        ("ray_tilerun_kv_spilled_bytes_total", ()): 6144,
        ("ray_tilerun_kv_prefetched_bytes_total", ()): 2048,
        ("ray_tilerun_allreduce_exposed_seconds_total", ()): 0.75,
        ("ray_tilerun_device_memory_bytes", (("rank", "1"),)): 1001,
        ("ray_tilerun_device_peak_memory_bytes", (("rank", "0"),)): 5000,
        ("ray_tilerun_engine_restarts", ()): 3,
        ("ray_tilerun_worker_rebuilds", ()): 1,
        # t1 once (0.375 s, though recorded many times), t2 once it had its first token (4 s).
        # (Ray exports the histogram's _sum from bucket midpoints: not compared.)
        ("ray_tilerun_time_to_first_token_seconds_count", ()): 2,
        ("ray_tilerun_time_to_first_token_seconds_bucket", (("le", "0.5"),)): 1,
        ("ray_tilerun_time_to_first_token_seconds_bucket", (("le", "5.0"),)): 2,
    }
    ours = {"rank", "tier", "state", "le"}
    deadline, got = time.monotonic() + 120, {}  # Ray exports every few seconds
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(url, timeout=30).read().decode()
        got = {
            (name, tuple(sorted((k, v) for k, v in labels.items() if k in ours))): value
            for name, labels, value in _parse(text)
            if name.startswith("ray_tilerun_") and labels.get("WorkerId") == worker_id
        }
        if all(got.get(k) == pytest.approx(v) for k, v in want.items()):
            break
        time.sleep(1)
    missing = {k: (v, got.get(k)) for k, v in want.items() if got.get(k) != pytest.approx(v)}
    assert not missing, f"wanted vs exported: {missing}"
    # Every documented metric is exported under its documented name.
    names = {n.removesuffix("_total").removeprefix("ray_") for n, _ in got}
    assert set(METRICS) <= {re.sub(r"_(count|sum|bucket)$", "", n) for n in names}
