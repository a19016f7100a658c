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

So the worker times the steps. For each *kind* of step (``step_kind``: how many sequences,
whether it is pure decode, how many host blocks within about 19 %), the first steps alternate
between the model's pick and streaming, ``TRIALS`` of each, and from then on the kind runs
whichever was faster on average; every ``RECHECK`` steps the other mode gets ``TRIALS`` steps
again, so a change of load is noticed. A new kind (a sequence joins, blocks spill) starts
afresh. Both modes are exact, so this only ever changes speed. Each rank decides alone.
"""

from __future__ import annotations

import math
from collections import deque

TRIALS = 2  # timed steps of each mode before a kind commits to one
RECHECK = 256  # committed steps after which the other mode is timed again


def step_kind(num_seqs: int, decode: bool, host_blocks: int) -> tuple[int, bool, int]:
    """The key steps are grouped by: host block counts in buckets a quarter octave wide."""
    return num_seqs, decode, round(4 * math.log2(max(host_blocks, 1)))


class SpillTuner:
    """Chooses between the model's cooperate pick and streaming by measured step seconds."""

    def __init__(self, trials: int = TRIALS, recheck: int = RECHECK) -> None:
        if trials < 1 or recheck < 1:
            raise ValueError(f"SpillTuner: trials ({trials}) and recheck ({recheck}) must be >= 1")
        self.trials, self.recheck = trials, recheck
        self._times: dict[tuple, dict[str, deque]] = {}
        self._committed: dict[tuple, int] = {}  # kind -> steps run since it last committed

    def pick(self, kind: tuple, modelled: str) -> str:
        """The mode to run this step: ``modelled`` (the cost model's pick, not ``stream``) or
        ``stream``."""
        modes = (modelled, "stream")
        times = self._times.setdefault(kind, {})
        for m in modes:
            times.setdefault(m, deque(maxlen=self.trials))
        short = [m for m in modes if len(times[m]) < self.trials]
        if short:  # still timing: the mode with fewer samples, the model's first
            return min(short, key=lambda m: len(times[m]))
        best = min(modes, key=lambda m: sum(times[m]) / len(times[m]))
        steps = self._committed.get(kind, 0)
        if steps >= self.recheck:  # time the other mode again
            self._committed[kind] = 0
            other = modes[1] if best == modes[0] else modes[0]
            times[other].clear()
            return other
        self._committed[kind] = steps + 1
        return best

    def record(self, kind: tuple, mode: str, seconds: float) -> None:
        """What a step of ``kind`` run in ``mode`` took (its forward pass, synchronised)."""
        times = self._times.get(kind)
        if times is not None and mode in times:
            times[mode].append(seconds)

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean seconds per mode for each kind timed so far (for logs and results)."""
        return {
            str(kind): {m: sum(t) / len(t) for m, t in times.items() if t}
            for kind, times in self._times.items()
        }


__all__ = ["RECHECK", "TRIALS", "SpillTuner", "step_kind"]
