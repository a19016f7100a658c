"""``--spill auto``: where the cost model picks *cooperate*, the steps' own times decide.

``scheduler.spill_cost`` weighs the link, the device and the CPU part of a layer as if they ran
side by side. They do not quite: the CPU part runs on the thread that launches the layers, so
the rest of each layer (its merge, the projections, the launches) waits behind it. Measured on
2026-12-05 (Llama-3-8B shape, 128K context with 64K of it on the device, decode):

* H100: a cooperating step took 171 ms, of which the CPU part 118 ms (4.29 GB at 36.5 GB/s,
  the rate the warm-up probe measures) and the rest of the cooperate path 18 ms; a streaming
  step took 151 ms (8.6 GB of host KV at ~55 GB/s is 156);
* H200 machine: ``auto``'s model put a step at 97 ms and cooperated; it took 256 ms, where
  streaming took 159.

So the worker times the steps. Its candidates are the model's pick, the same with half the
CPU's share (the model gives the CPU too much when it misses that serial time) and streaming.
For each *kind* of step (``step_kind``: how many sequences, whether it is pure decode, how many
host blocks within about 19 %), the first steps go through the candidates in turn, ``TRIALS``
of each, and from then on the kind runs whichever was fastest on average; every ``RECHECK``
steps the others get ``TRIALS`` steps again, so a change of load is noticed. A new kind (a
sequence joins, blocks spill) starts afresh. Every candidate is exact, so this only ever
changes speed. Each rank decides alone.
"""

from __future__ import annotations

import math
from collections import deque

TRIALS = 2  # timed steps of each candidate before a kind commits to one
RECHECK = 256  # committed steps after which the other candidates are timed again


def step_kind(num_seqs: int, decode: bool, host_blocks: int) -> tuple[int, bool, int]:
    """The key steps are grouped by: host block counts in buckets a quarter octave wide."""
    return num_seqs, decode, round(4 * math.log2(max(host_blocks, 1)))


class SpillTuner:
    """Chooses among candidate spill choices (the model's cooperate pick, a smaller CPU share,
    streaming) by measured step seconds."""

    def __init__(self, trials: int = TRIALS, recheck: int = RECHECK) -> None:
        if trials < 1 or recheck < 1:
            raise ValueError(f"SpillTuner: trials ({trials}) and recheck ({recheck}) must be >= 1")
        self.trials, self.recheck = trials, recheck
        self._times: dict[tuple, dict[str, deque]] = {}
        self._committed: dict[tuple, int] = {}  # kind -> steps run since it last committed

    def pick(self, kind: tuple, candidates: tuple[str, ...]) -> str:
        """The candidate to run this step (names the caller maps to choices; the model's pick
        first)."""
        times = self._times.setdefault(kind, {})
        for m in candidates:
            times.setdefault(m, deque(maxlen=self.trials))
        short = [m for m in candidates if len(times[m]) < self.trials]
        if short:  # still timing: the candidate with fewest samples, in the given order
            return min(short, key=lambda m: len(times[m]))
        best = min(candidates, key=lambda m: sum(times[m]) / len(times[m]))
        steps = self._committed.get(kind, 0)
        if steps >= self.recheck:  # time the others again
            self._committed[kind] = 0
            for m in candidates:
                if m != best:
                    times[m].clear()
            return next(m for m in candidates if m != best)
        self._committed[kind] = steps + 1
        return best

    def record(self, kind: tuple, mode: str, seconds: float) -> None:
        """What a step of ``kind`` run as candidate ``mode`` took (its forward pass,
        synchronised)."""
        times = self._times.get(kind)
        if times is not None and mode in times:
            times[mode].append(seconds)

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean seconds per candidate for each kind timed so far (for logs and results)."""
        return {
            str(kind): {m: sum(t) / len(t) for m, t in times.items() if t}
            for kind, times in self._times.items()
        }


__all__ = ["RECHECK", "TRIALS", "SpillTuner", "step_kind"]
