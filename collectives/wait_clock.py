"""How long a rank's computation waited on AllReduce, step by step.

An AllReduce is *exposed* for as long as the computation cannot go on without its result: the
whole call for a plain (synchronous) AllReduce, the ``wait()`` on each handle for the tiled one
(its tiles were in flight while later tiles computed; what is left when the last tile is done is
what the step pays). On the host (gloo, MPI, a CPU device) that is wall time around the call or
the wait. On CUDA the host returns at once and the *compute stream* is what waits, so the clock
records a pair of timing events around it on that stream and reads them after the step's
synchronisation. Work being captured into a CUDA graph is not timed (events with timing cannot
be captured): replayed decode steps report no AllReduce time.
"""

from __future__ import annotations

import contextlib
import time

import torch


class WaitClock:
    """Accumulates exposed AllReduce time; ``reset`` before a step, ``seconds`` after it."""

    def __init__(self) -> None:
        self._host_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def reset(self) -> None:
        self._host_s = 0.0
        self._events.clear()

    @contextlib.contextmanager
    def waiting(self, device: torch.device):
        """Time the block as waited-for AllReduce (on ``device``'s current stream for CUDA)."""
        if device.type == "cuda":
            if torch.cuda.is_current_stream_capturing():
                yield
                return
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._host_s += time.perf_counter() - t0

    def take(self) -> WaitClock:
        """This step's timings, moved to a clock of their own and this one reset: the step is
        read after it is done, while the next step may already be timing (overlapped loop)."""
        taken = WaitClock()
        taken._host_s, taken._events = self._host_s, self._events
        self._host_s, self._events = 0.0, []
        return taken

    def seconds(self) -> float:
        """Exposed AllReduce seconds since ``reset`` (CUDA: call after the step synchronised)."""
        dev_s = sum(a.elapsed_time(b) for a, b in self._events) / 1e3
        return self._host_s + dev_s
