"""Cancelling one sequence (the service's `tilerun cancel`): its blocks free, the others run on."""

from __future__ import annotations

from scheduler.config import SchedulerConfig
from scheduler.request import SamplingParams, Sequence
from scheduler.scheduler import Scheduler


def test_abort_frees_blocks_and_tells_the_workers():
    s = Scheduler(SchedulerConfig(block_size=4, prefill_chunk=64, max_model_len=64), num_blocks=8)
    a = Sequence(0, list(range(1, 10)), SamplingParams(max_new_tokens=4))
    b = Sequence(1, [1, 2, 3], SamplingParams(max_new_tokens=4))
    s.add(a)
    s.add(b)
    batch = s.schedule()
    s.update(batch, {0: 5, 1: 6})
    free_before = s.blocks.num_free
    assert s.abort(0) and not s.abort(0)
    assert s.blocks.num_free == free_before + 4  # 9 + 4 tokens of a: 4 blocks of 4
    nxt = s.schedule()
    assert nxt.finished_seq_ids == (0,) and [c.seq_id for c in nxt.chunks] == [1]
    waiting = Sequence(2, [1], SamplingParams(max_new_tokens=1))
    s.add(waiting)
    assert s.abort(2) and not s.waiting
