"""The two-tier scheduler (``scheduler.spill``) against a pure-Python stand-in for the workers.

The stand-in keeps real block contents: every global block id holds ``block_size`` slots; swaps
copy slots between ids in order; a step reads a sequence's earlier tokens back through its block
table and writes the new ones. Its "model" picks the next token from what it read, so a wrong
placement (a stale block, a block overwritten by a swap, a table entry pointing elsewhere) changes
the generated tokens. The contract's invariants (/work/coord/SPILL.md) are asserted every step.
"""

from __future__ import annotations

import random

import pytest

from scheduler.config import SchedulerConfig
from scheduler.errors import CapacityError
from scheduler.request import SamplingParams, Sequence
from scheduler.scheduler import Scheduler
from scheduler.spill import SpillScheduler

VOCAB = 97


def plain_sched(num_blocks: int, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(**{"prefill_chunk": 512, **kw}), num_blocks)


def spill_sched(num_blocks: int, host_blocks: int, sink_blocks=1, recent_blocks=2, **kw):
    return SpillScheduler(
        SchedulerConfig(**{"prefill_chunk": 512, **kw}),
        num_blocks,
        host_blocks,
        sink_blocks,
        recent_blocks,
    )


class FakeWorkers:
    """Block storage over the global id space, and a model that reads it back."""

    def __init__(self, device_blocks: int, host_blocks: int, block_size: int) -> None:
        self.d, self.h, self.bs = device_blocks, host_blocks, block_size
        self.store: dict[int, list] = {}
        self.truth: dict[int, list[int]] = {}  # seq_id -> every token written so far
        self.swapped = 0

    def execute(self, sched: Scheduler, batch) -> dict[int, int]:
        d, bs = self.d, self.bs
        for src, dst in batch.swaps:
            assert 0 <= src < d + self.h and 0 <= dst < d + self.h
            assert (src < d) != (dst < d), f"swap {src}->{dst} stays in one tier"
            self.store[dst] = list(self.store.get(src, [None] * bs))
            self.swapped += 1
        check_invariants(sched, batch, d, bs)
        sampled = {}
        for c in batch.chunks:
            known = self.truth.setdefault(c.seq_id, [])
            assert len(known) == c.start_pos, "the step starts where the cache ends"
            context = []
            for pos in range(c.start_pos):
                got = self.store[c.block_table[pos // bs]][pos % bs]
                assert got == (c.seq_id, pos, known[pos]), f"seq {c.seq_id} pos {pos} read {got}"
                context.append(got[2])
            for i, tok in enumerate(c.token_ids):
                pos = c.start_pos + i
                block = c.block_table[pos // bs]
                self.store.setdefault(block, [None] * bs)[pos % bs] = (c.seq_id, pos, tok)
                known.append(tok)
                context.append(tok)
            if c.sample:
                sampled[c.seq_id] = sum((i + 1) * t for i, t in enumerate(context)) % VOCAB
        return sampled

    def finish(self, seq_ids) -> None:
        for s in seq_ids:
            self.truth.pop(s, None)


def check_invariants(sched: Scheduler, batch, d: int, bs: int) -> None:
    seen: set[int] = set()
    for seq in sched.running:
        for b in seq.block_table:
            assert b not in seen, f"block {b} in two places"
            seen.add(b)
    if isinstance(sched, SpillScheduler):
        free_dev, free_host = sched.tiers.free_ids()
        assert not (seen & (free_dev | free_host)), "a block is both free and in a table"
        assert len(seen) + len(free_dev) + len(free_host) == sched.tiers.num_blocks
        for seq in sched.running:
            assert sched._on_host.get(seq.seq_id, 0) == sum(b >= d for b in seq.block_table)
    for c in batch.chunks:
        if isinstance(sched, SpillScheduler):  # the plain scheduler reserves whole lifetimes
            assert len(c.block_table) == -(-c.seq_len // bs)
        for pos in range(c.start_pos, c.seq_len):
            assert c.block_table[pos // bs] < d, "a block the step writes is on the host"
        for idx, b in enumerate(c.block_table):
            if b >= d:
                assert (idx + 1) * bs <= c.start_pos, "a host block is not full before start_pos"


def run(sched: Scheduler, workers: FakeWorkers, arrivals, max_steps=20000):
    """``arrivals``: list of (step, seq_id, prompt, params). Returns seq_id -> output tokens."""
    arrivals = sorted(arrivals, key=lambda a: a[0])
    seqs: dict[int, Sequence] = {}
    step = 0
    while arrivals or sched.has_work:
        while arrivals and arrivals[0][0] <= step:
            _, sid, prompt, params = arrivals.pop(0)
            seqs[sid] = Sequence(sid, prompt, params)
            sched.add(seqs[sid])
        step += 1
        assert step < max_steps, "no progress"
        batch = sched.schedule()
        if batch is None:
            continue
        sampled = workers.execute(sched, batch)
        done = sched.update(batch, sampled)
        workers.finish(s.seq_id for s in done)
    return {sid: s.output_ids for sid, s in seqs.items()}


def random_workload(rng: random.Random, bs: int, n: int):
    out = []
    for sid in range(n):
        plen = rng.choice([1, 2, bs - 1, bs, bs + 1, rng.randint(1, 12 * bs)])
        plen = max(plen, 1)
        prompt = [rng.randrange(VOCAB) for _ in range(plen)]
        params = SamplingParams(max_new_tokens=rng.randint(1, 3 * bs), ignore_eos=True)
        out.append((rng.randint(0, 6), sid, prompt, params))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_random_placements_never_change_tokens(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 16])
    work = random_workload(rng, bs, rng.randint(1, 6))
    chunk = rng.choice([1, 3, bs, 2 * bs + 1, 64])
    seats = rng.randint(1, 4)
    need = max(-(-(len(p) + sp.max_new_tokens) // bs) for _, _, p, sp in work)
    total = sum(-(-(len(p) + sp.max_new_tokens) // bs) for _, _, p, sp in work)
    # plain run: a device pool with room for every lifetime at once
    plain = plain_sched(
        num_blocks=total,
        block_size=bs,
        prefill_chunk=chunk,
        max_num_seqs=seats,
        max_model_len=10**6,
    )
    ref = run(plain, FakeWorkers(total, 0, bs), work)
    # spill run: a tiny device pool, a host pool with room for at least the largest request
    dev = rng.randint(1, max(1, need // 2))
    host = rng.randint(need, need + total)
    sched = spill_sched(
        num_blocks=dev,
        block_size=bs,
        prefill_chunk=chunk,
        max_num_seqs=seats,
        max_model_len=10**6,
        host_blocks=host,
        sink_blocks=rng.randint(0, 2),
        recent_blocks=rng.randint(0, 3),
    )
    workers = FakeWorkers(dev, host, bs)
    got = run(sched, workers, work)
    assert got == ref
    assert all(
        len(v) == sp.max_new_tokens
        for (_, sid, _, sp), v in zip(
            sorted(work, key=lambda a: a[1]), [got[i] for i in sorted(got)]
        )
    )
    assert sched.tiers.num_free_device == dev and sched.tiers.num_free_host == host
    assert sched._reserved == 0


def test_spill_moves_oldest_middle_blocks_and_keeps_sinks_and_newest():
    bs = 4
    s = spill_sched(
        num_blocks=4,
        block_size=bs,
        prefill_chunk=4,
        host_blocks=32,
        sink_blocks=1,
        recent_blocks=1,
        max_model_len=1000,
    )
    w = FakeWorkers(4, 32, bs)
    seq = Sequence(0, list(range(40)), SamplingParams(max_new_tokens=2, ignore_eos=True))
    s.add(seq)
    spilled_positions = []
    while s.has_work:
        b = s.schedule()
        for src, dst in b.swaps:
            if src < 4:
                spilled_positions.append(seq.block_table.index(dst))
        s.update(b, w.execute(s, b))
        if seq.in_prefill:
            t = seq.block_table
            assert t[0] < 4, "the sink block stays on the device"
            assert t[-1] < 4 and t[-2] < 4 if len(t) > 2 else True
    # middle blocks went out oldest first: 1, 2, 3, ...
    assert spilled_positions[:5] == [1, 2, 3, 4, 5]
    assert s.stats.blocks_spilled >= 5


def test_blocks_come_back_when_the_device_has_room():
    bs = 2
    s = spill_sched(
        num_blocks=12,
        block_size=bs,
        prefill_chunk=8,
        host_blocks=64,
        max_num_seqs=2,
        max_model_len=1000,
    )
    w = FakeWorkers(12, 64, bs)
    long_lived = Sequence(0, list(range(12)), SamplingParams(max_new_tokens=12, ignore_eos=True))
    big = Sequence(1, list(range(30)), SamplingParams(max_new_tokens=1, ignore_eos=True))
    s.add(long_lived)
    s.add(big)
    host_while_big, host_after = [], []
    while s.has_work:
        batch = s.schedule()
        s.update(batch, w.execute(s, batch))
        on_host = sum(x >= 12 for x in long_lived.block_table)
        (host_after if big.finish_reason else host_while_big).append(on_host)
    assert max(host_while_big) > 0, "the big prompt pushed the long-lived task's blocks out"
    # big's blocks are freed when its last step returns; the next step brings them all back
    assert host_after[0] > 0 and host_after[1] == 0
    assert s.stats.blocks_fetched >= max(host_while_big)


def test_preempted_task_resumes_with_identical_tokens():
    """Two blocks of device, three decoding tasks: one is paused each step (its blocks go to the
    host) and resumes later; the tokens equal a run with room for everything."""
    bs = 4
    prompts = [[(7 * i + j) % VOCAB for j in range(5 + 3 * i)] for i in range(3)]
    params = SamplingParams(max_new_tokens=9, ignore_eos=True)
    work = [(0, i, p, params) for i, p in enumerate(prompts)]
    plain = plain_sched(num_blocks=64, block_size=bs, max_model_len=1000)
    ref = run(plain, FakeWorkers(64, 0, bs), work)
    s = spill_sched(num_blocks=2, block_size=bs, host_blocks=32, max_model_len=1000)
    got = run(s, FakeWorkers(2, 32, bs), work)
    assert got == ref
    assert s.stats.preemptions >= 1


def test_new_task_preempts_running_one_when_device_is_full():
    bs = 4
    s = spill_sched(
        num_blocks=2, block_size=bs, host_blocks=32, max_model_len=1000, prefill_chunk=16
    )
    w = FakeWorkers(2, 32, bs)
    old = Sequence(0, list(range(6)), SamplingParams(max_new_tokens=20, ignore_eos=True))
    s.add(old)
    for _ in range(3):  # old is decoding, its 2 blocks fill the device
        b = s.schedule()
        s.update(b, w.execute(s, b))
    assert all(x < 2 for x in old.block_table)
    new = Sequence(1, [5] * 5, SamplingParams(max_new_tokens=3, ignore_eos=True))
    s.add(new)
    ran_new = False
    while s.has_work:
        b = s.schedule()
        ran_new |= any(c.seq_id == 1 for c in b.chunks)
        s.update(b, w.execute(s, b))
    assert ran_new and len(new.output_ids) == 3 and len(old.output_ids) == 20
    assert s.stats.blocks_spilled > 0


def test_task_larger_than_both_tiers_names_what_fits_and_the_flags():
    s = spill_sched(num_blocks=8, block_size=16, host_blocks=256, max_model_len=10**6)
    running = Sequence(0, [1] * 20, SamplingParams(max_new_tokens=4))
    s.add(running)
    with pytest.raises(CapacityError) as e:
        s.add(Sequence(1, [1] * 5000, SamplingParams(max_new_tokens=4)))
    msg = str(e.value)
    assert "4208 tokens fit" in msg and "--kv-cache-tokens" in msg and "--kv-host-tokens" in msg
    assert list(s.waiting) == [running] and s.running == []  # nothing else disturbed


def test_plain_scheduler_message_unchanged():
    s = plain_sched(num_blocks=8, block_size=16, max_model_len=10**6)
    with pytest.raises(CapacityError, match=r"capacity of 128 tokens by 4 tokens; give the cache"):
        s.check_fits(128, SamplingParams(max_new_tokens=4))


def test_admission_counts_both_tiers():
    s = spill_sched(num_blocks=2, block_size=4, host_blocks=10, max_model_len=1000, max_num_seqs=8)
    for i in range(3):
        s.add(Sequence(i, [1] * 12, SamplingParams(max_new_tokens=4)))  # 4 blocks each
    s.schedule()
    # 11 usable blocks (12 minus the one kept free): two lifetimes of 4 fit, the third waits
    assert [q.seq_id for q in s.running] == [0, 1] and [q.seq_id for q in s.waiting] == [2]


def test_spill_scheduler_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, scheduler.spill, scheduler.tiers; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
