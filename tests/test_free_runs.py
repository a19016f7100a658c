"""How KV block ids are handed out (``scheduler.free_runs``): each sequence's blocks consecutive
in whole tiles, in a fresh pool, after churn, and when sequences grow side by side."""

from __future__ import annotations

import random

from scheduler.block_manager import BlockAllocator
from scheduler.free_runs import FreeBlocks
from scheduler.tiers import TierAllocator


def runs(table: list[int]) -> int:
    return 1 + sum(1 for a, b in zip(table, table[1:]) if b != a + 1)


def broken_tiles(table: list[int], extent: int) -> int:
    """Tiles (``extent`` table positions from a multiple of ``extent``) not of consecutive ids."""
    return sum(
        1
        for i in range(0, len(table) - extent + 1, extent)
        if table[i + extent - 1] - table[i] != extent - 1 or runs(table[i : i + extent]) > 1
    )


def test_whole_tiles_when_no_run_holds_the_sequence():
    f = FreeBlocks(0, 64, extent=8)
    assert f.take_run(64) == list(range(64))
    for b in [0, 2, *range(8, 16), *range(24, 32), *range(40, 48), 50, 51]:
        f.release(b)
    # 20 blocks: no run of free ids is that long; whole free extents, lowest first, so every
    # tile of 8 table positions is 8 consecutive ids
    t = f.take_run(20)
    assert t == [*range(8, 16), *range(24, 32), *range(40, 44)] and broken_tiles(t, 8) == 0
    # no whole extent left: the lowest free ids, every one handed out once
    t = f.take_run(8)
    assert t == [0, 2, 44, 45, 46, 47, 50, 51] and len(f) == 0


def test_a_best_fit_starts_at_an_extent_boundary_where_it_fits_from_there():
    f = FreeBlocks(0, 64, extent=8)
    assert f.take_run(64) == list(range(64))
    for b in [*range(3, 21), *range(37, 50)]:  # runs [3, 21) and [37, 50)
        f.release(b)
    # 12 blocks: the smaller run [37, 50) holds them, but from 40 only 10: its start
    assert f.take_run(12) == list(range(37, 49))
    # 9 blocks: [3, 21) from its first boundary, 8, so tile 0 of the sequence is extent 1
    assert f.take_run(9) == list(range(8, 17))
    # fewer than a tile: the smallest run that holds it ([17, 21) of [3, 8), [17, 21), [49, 50)),
    # from its start
    assert f.take_run(2) == [17, 18]


def test_sequences_growing_side_by_side_keep_their_own_tiles():
    # two sequences decoding in the same steps take a block each in turn; the lowest free id
    # would interleave them (every block a run of its own)
    tiers = TierAllocator(device_blocks=64, host_blocks=16, block_size=16)  # 8 blocks a tile
    a, b = [], []
    for _ in range(20):
        a.append(tiers.take_device(a[-1] if a else None))
        b.append(tiers.take_device(b[-1] if b else None))
    assert a[:16] == [*range(8), *range(16, 24)] and b[:16] == [*range(8, 16), *range(24, 32)]
    assert broken_tiles(a, 8) == broken_tiles(b, 8) == 0
    # host blocks a sequence spills in order are consecutive too (one copy per run)
    h = []
    for _ in range(10):
        h.append(tiers.take_host(h[-1] if h else None))
    assert h == list(range(64, 74))
    tiers.free(a)
    tiers.free(b)
    tiers.free(h)
    assert tiers.free_ids() == (frozenset(range(64)), frozenset(range(64, 80)))


def test_a_pool_in_use_for_hours_still_gives_whole_tiles():
    # a service-like trace: sequences of 0.5K-128K tokens (log-normal) arrive and finish in
    # mixed order, at most 16 at once, in a pool of 24,000 blocks (a 7B model's H100 pool)
    rnd = random.Random(0)
    alloc = BlockAllocator(num_blocks=24000, block_size=16)
    live: list[tuple[float, list[int]]] = []
    now, single, aligned, tables = 0.0, 0, 0, 0
    for i in range(300):
        length = int(min(131072, max(512, rnd.lognormvariate(9.0, 1.2))))
        while len(live) >= 16 or not alloc.can_allocate(length):
            live.sort()
            alloc.free(live.pop(0)[1])
        table: list[int] = []
        alloc.grow(table, length)
        got = list(table)  # freed (and cleared) below if it finishes before the next arrival
        live.append((now + length * rnd.uniform(0.5, 1.5), table))
        now += rnd.expovariate(1 / 3000)
        live.sort()
        while live and live[0][0] < now:
            alloc.free(live.pop(0)[1])
        if i >= 50:  # once the pool has churned
            assert broken_tiles(got, 8) == 0, f"sequence {i}: {runs(got)} runs"
            single += runs(got) == 1
            aligned += got[0] % 8 == 0
            tables += 1
    assert single / tables > 0.85  # the lowest-free-id policy gave 0.54-0.63 here
    assert aligned / tables > 0.95  # from the run's start: 0.33


def test_the_lazy_heaps_stay_bounded():
    f = FreeBlocks(0, 32, extent=4)
    for _ in range(1000):
        blocks = [f.take() for _ in range(10)]
        for b in blocks:
            f.release(b)
    assert len(f) == 32 and len(f._whole) <= 2 * 8 + 64


def test_the_runs_it_keeps_are_the_free_ids_runs():
    # random takes (single, following, whole lifetimes) and releases; after each, the runs the
    # structure keeps for its best fit are exactly the maximal runs of the free ids
    rnd = random.Random(5)
    f = FreeBlocks(100, 400, extent=8)
    held: list[int] = []
    for _ in range(2000):
        op = rnd.random()
        if op < 0.3 and len(f):
            held.append(f.take(rnd.choice(held) if held and rnd.random() < 0.5 else None))
        elif op < 0.5 and len(f) >= 20:
            held += f.take_run(rnd.randint(1, 20))
        elif held:
            f.release(held.pop(rnd.randrange(len(held))))
        free = sorted(f.ids())
        assert len(set(held)) == len(held) and not set(held) & set(free)
        assert len(free) + len(held) == 300
        want = [(b, b + 1) for b in free]
        merged: list[tuple[int, int]] = []
        for s, e in want:
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        assert [(s, f._end_of[s]) for s in f._starts] == merged
