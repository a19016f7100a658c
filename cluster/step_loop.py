"""The step loop: schedule -> submit to the workers -> take the result back -> update.

One loop for ``Engine.generate`` and the service's ``ServiceLoop``. With ``overlap``
(``SchedulerConfig.overlap_schedule``) steps i+1..i+d are scheduled and sent before step i's
tokens are back (d: the executor's ``pipeline_depth``, 1 unless a benchmark asks for more), in
the manner of SGLang's overlap scheduler and vLLM's async scheduling: the driver's CPU work
(scheduling, building the batch, the transport hop to the workers, then applying step i's
tokens, progress, detokenising finished tasks) happens while the devices run.

What that asks of the layers below:

* the scheduler counts ahead (``Sequence.num_scheduled``, ``num_pending``): a decode chunk
  whose input token is still being sampled carries ``PENDING_TOKEN``, which each worker fills in
  on the device from what it sampled last for that sequence (``runtime.worker``);
* stop tokens and cancels are learned up to d steps late: a step already sent for a sequence that
  has finished is run and its token discarded (``Scheduler.update``); its blocks were freed when
  the stop was learned, and workers run steps in the order they are sent, so no later step sees
  them before it. A length stop is never late (the scheduler knows ``max_new_tokens``);
* workers run steps in submission order, and the executor gives results in that order.

Off, the loop takes each step back right after sending it: the plain loop, kept for ablation
and debugging. Both give the same tokens (tests/test_step_loop.py).
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass

from scheduler.batch import ScheduledBatch
from scheduler.request import Sequence


@dataclass
class StepDone:
    """One step taken back: its batch, the workers' result, the sequences it finished, and the
    sequences whose chunk was discarded (they had stopped or been aborted meanwhile)."""

    batch: ScheduledBatch
    result: object  # runtime.worker.StepResult
    finished: list[Sequence]
    discarded: frozenset[int]


class StepLoop:
    def __init__(self, scheduler, executor, overlap: bool) -> None:
        """``scheduler``: a ``Scheduler``; ``executor``: anything with ``submit(batch, logits,
        hold)`` returning a handle whose ``result()`` is the step's ``StepResult``, and
        ``pipeline_depth``: the steps left in flight after each turn when ``overlap`` is on."""
        self.scheduler = scheduler
        self.executor = executor
        self.overlap = overlap
        self._flight: deque[tuple[ScheduledBatch, object]] = deque()

    @property
    def in_flight(self) -> int:
        return len(self._flight)

    @property
    def depth(self) -> int:
        """Steps left in flight after a turn (read each turn: a benchmark may change it)."""
        return getattr(self.executor, "pipeline_depth", 1) if self.overlap else 0

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._flight)

    def advance(self, logits: str = "none") -> list[StepDone] | None:
        """One turn: schedule and send the next step if there is one, then take back the oldest
        step in flight unless the pipeline still has room. Returns the steps taken back (empty
        while the first step of a run is the only one in flight), or None when there was
        nothing to send and nothing in flight (idle)."""
        depth = self.depth  # steps left in flight after a turn
        sent = False
        if len(self._flight) <= depth:
            batch = self.scheduler.schedule()
            if batch is not None:
                # with overlap the next submit comes before this step is asked for: the
                # executor may return this step with the next (``_Executor.submit``)
                handle = self.executor.submit(batch, logits, hold=self.overlap)
                self._flight.append((batch, handle))
                sent = True
        if not self._flight:
            return None
        if sent and len(self._flight) <= depth:
            return []
        return [self._take()]

    def drain(self) -> list[StepDone]:
        """Take back every step in flight."""
        return [self._take() for _ in range(len(self._flight))]

    def abandon(self) -> None:
        """Forget the steps in flight after a failure, waiting for each (errors ignored) so that
        the workers are idle before anything else is sent; the caller aborts the sequences."""
        while self._flight:
            _, handle = self._flight.popleft()
            if getattr(self.executor, "broken", False):
                continue  # a dead group: its calls fail or hang, and it is torn down anyway
            with contextlib.suppress(Exception):
                handle.result()

    def _take(self) -> StepDone:
        batch, handle = self._flight[0]
        result = handle.result()  # raises (worker died, ...) with the step still counted
        self._flight.popleft()
        live = {s.seq_id for s in self.scheduler.running}
        discarded = frozenset(c.seq_id for c in batch.chunks if c.seq_id not in live)
        finished = self.scheduler.update(batch, result.sampled)
        return StepDone(batch, result, finished, discarded)
