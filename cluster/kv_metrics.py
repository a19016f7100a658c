"""Step figures of one ``generate`` call: KV blocks per tier, bytes moved, exposed movement time,
and the time the steps waited on AllReduce.

Workers report per-step figures in ``StepResult`` (SPILL.md): ``bytes_moved`` (swaps and
staging copies), ``movement_exposed_s`` (seconds the step waited on movement), ``spill_mode``
(how host-resident blocks were attended: ``stream``, ``cooperate``, or ``none`` when the step
read no host block), ``allreduce_exposed_s`` (seconds rank 0's step waited on AllReduce, not
hidden behind compute; ``collectives.wait_clock``). The scheduler adds how many blocks it
spilled, fetched, and how often it preempted. ``by_kind`` splits the steps by kind (prefill:
any chunk of more than one token; decode) and mode, with their wall seconds, exposed movement
and the CPU's share of the host blocks: where a long task's time went.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class KVMeter:
    device_blocks: int
    host_blocks: int
    block_size: int
    steps: int = 0
    bytes_moved: int = 0
    exposed_move_s: float = 0.0
    allreduce_exposed_s: float = 0.0
    modes: Counter = field(default_factory=Counter)
    by_kind: dict = field(default_factory=dict)  # "prefill/stream" -> totals of those steps
    scheduler_stats: object = None  # the scheduler's SpillStats (totals since start-up), if any
    _stats_at_start: dict = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)  # when the last step was counted

    def __post_init__(self) -> None:
        if self.scheduler_stats is not None:
            self._stats_at_start = dict(vars(self.scheduler_stats))

    def add(self, result, batch=None) -> None:
        """Count one step's ``StepResult`` (of ``batch``, the ``ScheduledBatch``, if given).

        A step's ``seconds`` in ``by_kind`` is the wall time since the previous step was
        counted: with steps overlapped, the time from one's launch to its result also holds the
        end of the one before, and those would not add up to the call's time."""
        now = time.perf_counter()
        wall, self._last = now - self._last, now
        self.steps += 1
        self.bytes_moved += result.bytes_moved
        self.exposed_move_s += result.movement_exposed_s
        self.allreduce_exposed_s += result.allreduce_exposed_s
        self.modes[result.spill_mode] += 1
        if batch is not None:
            prefill = any(len(c.token_ids) > 1 for c in batch.chunks)
            key = f"{'prefill' if prefill else 'decode'}/{result.spill_mode}"
            k = self.by_kind.get(key)
            if k is None:
                k = self.by_kind[key] = dict.fromkeys(
                    ("steps", "seconds", "exposed_s", "bytes_moved", "host_blocks", "cpu_blocks"), 0
                )
            k["steps"] += 1
            k["seconds"] += wall
            k["exposed_s"] += result.movement_exposed_s
            k["bytes_moved"] += result.bytes_moved
            k["host_blocks"] += result.host_blocks
            k["cpu_blocks"] += result.cpu_blocks

    def as_dict(self) -> dict:
        d = {
            "device_blocks": self.device_blocks,
            "host_blocks": self.host_blocks,
            "block_size": self.block_size,
            "steps": self.steps,
            "bytes_moved": self.bytes_moved,
            "bytes_moved_per_step": self.bytes_moved / self.steps if self.steps else 0.0,
            "exposed_move_s": self.exposed_move_s,
            "allreduce_exposed_s": self.allreduce_exposed_s,
            "modes": dict(self.modes),
            "by_kind": {k: dict(v) for k, v in self.by_kind.items()},
        }
        if self.scheduler_stats is not None:  # this call's share of the totals
            for k, v in vars(self.scheduler_stats).items():
                d[k] = v - self._stats_at_start.get(k, 0)
        return d
