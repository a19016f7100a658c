"""Step figures of one ``generate`` call: KV blocks per tier, bytes moved, exposed movement time,
and the time the steps waited on AllReduce.

Workers report per-step figures in ``StepResult`` (SPILL.md): ``bytes_moved`` (swaps and
staging copies), ``movement_exposed_s`` (seconds the step waited on movement), ``spill_mode``
(how host-resident blocks were attended: ``stream``, ``cooperate``, or ``none`` when the step
read no host block), ``allreduce_exposed_s`` (seconds rank 0's step waited on AllReduce, not
hidden behind compute; ``collectives.wait_clock``). The scheduler adds how many blocks it
spilled, fetched, and how often it preempted.
"""

from __future__ import annotations

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
    scheduler_stats: object = None  # the scheduler's SpillStats (totals since start-up), if any
    _stats_at_start: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scheduler_stats is not None:
            self._stats_at_start = dict(vars(self.scheduler_stats))

    def add(self, result) -> None:
        """Count one step's ``StepResult``."""
        self.steps += 1
        self.bytes_moved += result.bytes_moved
        self.exposed_move_s += result.movement_exposed_s
        self.allreduce_exposed_s += result.allreduce_exposed_s
        self.modes[result.spill_mode] += 1

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
        }
        if self.scheduler_stats is not None:  # this call's share of the totals
            for k, v in vars(self.scheduler_stats).items():
                d[k] = v - self._stats_at_start.get(k, 0)
        return d
