"""The scheduler and block manager: pure Python bookkeeping, no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scheduler.block_manager import BlockAllocator
from scheduler.config import SchedulerConfig
from scheduler.errors import CapacityError
from scheduler.request import SamplingParams, Sequence
from scheduler.scheduler import Scheduler


def test_scheduler_package_never_imports_torch():
    code = (
        "import sys, scheduler.scheduler, scheduler.config, scheduler.batch;"
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_block_allocator_grows_and_frees():
    a = BlockAllocator(num_blocks=4, block_size=16)
    t: list[int] = []
    a.grow(t, 17)
    assert len(t) == 2 and a.num_free == 2
    a.grow(t, 32)
    assert len(t) == 2
    with pytest.raises(CapacityError, match="needs 4 more blocks of 16 tokens, only 2 free of 4"):
        a.grow(t, 6 * 16)
    assert len(t) == 2  # a failed grow takes nothing
    a.free(t)
    assert t == [] and a.num_free == 4


def _sched(num_blocks: int = 64, **kw) -> Scheduler:
    return Scheduler(
        SchedulerConfig(**{"block_size": 4, "max_model_len": 4096, "prefill_chunk": 512, **kw}),
        num_blocks,
    )


def test_chunked_prefill_splits_prompt_by_budget_then_decodes():
    s = _sched(prefill_chunk=10)
    seq = Sequence(0, list(range(25)), SamplingParams(max_new_tokens=3))
    s.add(seq)
    sizes = []
    while s.has_work:
        b = s.schedule()
        sizes.append([(len(c.token_ids), c.start_pos, c.sample) for c in b.chunks])
        s.update(b, {c.seq_id: 7 for c in b.chunks if c.sample})
    assert sizes == [
        [(10, 0, False)],
        [(10, 10, False)],
        [(5, 20, True)],
        [(1, 25, True)],
        [(1, 26, True)],
    ]
    assert seq.output_ids == [7, 7, 7] and seq.finish_reason == "length"
    assert s.blocks.num_free == 64


def test_decodes_share_budget_with_prefill_and_blocks_are_reserved():
    s = _sched(prefill_chunk=8, max_num_seqs=2)
    a = Sequence(0, [1] * 3, SamplingParams(max_new_tokens=4))
    b = Sequence(1, [2] * 20, SamplingParams(max_new_tokens=2))
    s.add(a)
    s.add(b)
    first = s.schedule()
    assert [(c.seq_id, len(c.token_ids)) for c in first.chunks] == [(0, 3), (1, 5)]
    s.update(first, {0: 9})
    second = s.schedule()
    # a decodes (1 token), b continues its prompt with the other 7
    assert [(c.seq_id, len(c.token_ids)) for c in second.chunks] == [(0, 1), (1, 7)]
    # whole lifetimes are reserved at admission: ceil(7/4) + ceil(22/4) blocks
    assert s.blocks.num_free == 64 - 2 - 6


def test_stop_tokens_finish_early():
    s = _sched()
    seq = Sequence(0, [1, 2], SamplingParams(max_new_tokens=10), eos_token_ids=(5,))
    s.add(seq)
    b = s.schedule()
    assert s.update(b, {0: 5}) == [seq] and seq.finish_reason == "stop"


def test_capacity_limits_say_which_and_by_how_much():
    s = _sched(num_blocks=4, max_model_len=100)
    with pytest.raises(CapacityError, match="max_model_len=100 by 10 tokens"):
        s.add(Sequence(0, [1] * 90, SamplingParams(max_new_tokens=20)))
    with pytest.raises(CapacityError, match="KV cache capacity of 16 tokens by 4 tokens"):
        s.add(Sequence(0, [1] * 10, SamplingParams(max_new_tokens=10)))
    assert not s.has_work


def test_allocator_gives_a_sequence_the_smallest_run_that_holds_it():
    a = BlockAllocator(num_blocks=16, block_size=4)
    first, second = [], []
    a.grow(first, 4 * 5)  # blocks 0..4
    a.grow(second, 4 * 3)  # blocks 5..7
    a.free(first)  # free runs now: 0..4 and 8..15
    t = []
    a.grow(t, 4 * 8)  # only 8..15 holds it whole (the lowest ids would have split it)
    assert t == list(range(8, 16))
    small = []
    a.grow(small, 4 * 2)  # the smallest run that fits: 0..4, not a piece of a larger one
    assert small == [0, 1]
    a.free(second)
    a.free(t)
    a.free(small)
    t = []
    a.grow(t, 4 * 16)  # everything back: one run from 0
    assert t == list(range(16)) and a.num_free == 0


def test_prefill_chunk_defaults_by_device_and_the_users_value_wins():
    from scheduler.config import auto_prefill_chunk
    from scheduler.errors import ConfigError

    unset = SchedulerConfig(max_model_len=4096)
    assert unset.for_device("cuda").prefill_chunk == auto_prefill_chunk("cuda") == 8192
    assert unset.for_device("cpu").prefill_chunk == auto_prefill_chunk("cpu") == 2048
    assert SchedulerConfig(prefill_chunk=300).for_device("cuda").prefill_chunk == 300
    with pytest.raises(ConfigError, match="prefill_chunk is unset.*for_device"):
        Scheduler(unset, 8)
