"""Free KV block ids handed out so that each sequence's blocks stay consecutive in whole tiles.

Attention kernels read a sequence's keys fastest when the blocks of each key tile are
consecutive ids: the Hopper kernels then load a tile as one TMA box (else they gather it row by
row, ~4 % slower at batch 16 on an H100), and the CPU and CUDA fused backends read a run of
consecutive blocks in place (a sequence in more than ``MAX_RUNS`` runs is copied every step).
Handing out the lowest free id keeps a fresh pool in order but not a used one: after sequences
of mixed lengths come and go, a new sequence fills the holes they left (a third of sequences had
a broken tile in a service-like trace), and sequences that grow in the same steps (decode, or
chunks side by side) interleave their blocks one by one.

So ids are kept in aligned extents of ``extent`` blocks (one tile of keys):

* :meth:`FreeBlocks.take_run` (a whole lifetime at once) takes the smallest run of consecutive
  free ids that holds all of it (best fit: the large runs stay for large sequences), from the
  run's first extent boundary where it fits from there (the sequence's tiles are then the
  pool's extents); where no run holds it, whole free extents, lowest first, so every tile is
  still consecutive.
* :meth:`FreeBlocks.take` (one block as a sequence grows) takes the id after the sequence's last
  one while that stays in the same extent, or starts a wholly free extent; sequences growing
  side by side then each fill their own extents.

Either falls back to the lowest free id when the pool has no whole extent left (nearly full).
"""

from __future__ import annotations

import bisect
import heapq


class FreeBlocks:
    """The free ids of ``[lo, hi)``; ``extent`` blocks make a tile."""

    def __init__(self, lo: int, hi: int, extent: int) -> None:
        self.lo, self.hi, self.extent = lo, hi, max(1, extent)
        self._num_free = hi - lo
        n_ext = -(-(hi - lo) // self.extent)
        self._count = [self._size(x) for x in range(n_ext)]  # free ids per extent
        self._whole: list[int] = list(range(n_ext))  # heap of wholly free extents (lazy)
        # the free ids, as maximal runs [start, end): sorted starts, and both ends looked up, so
        # a best fit is a scan of the runs (few), not of the free ids (a pool holds 100K+), and
        # the lowest free id is the first start
        self._starts: list[int] = [lo] if hi > lo else []
        self._end_of: dict[int, int] = {lo: hi} if hi > lo else {}
        self._start_of: dict[int, int] = {hi: lo} if hi > lo else {}

    def _size(self, x: int) -> int:
        start = self.lo + x * self.extent
        return min(self.extent, self.hi - start)

    def __len__(self) -> int:
        return self._num_free

    def __contains__(self, block: int) -> bool:
        i = bisect.bisect_right(self._starts, block) - 1
        return i >= 0 and block < self._end_of[self._starts[i]]

    def ids(self) -> frozenset[int]:
        return frozenset(b for start in self._starts for b in range(start, self._end_of[start]))

    # -- runs ------------------------------------------------------------------------------------
    def _add_run(self, start: int, end: int) -> None:
        bisect.insort(self._starts, start)
        self._end_of[start], self._start_of[end] = end, start

    def _drop_run(self, start: int) -> int:
        """Forget the run starting at ``start``; its end."""
        del self._starts[bisect.bisect_left(self._starts, start)]
        end = self._end_of.pop(start)
        del self._start_of[end]
        return end

    # -- taking ----------------------------------------------------------------------------------
    def _take_range(self, start: int, n: int) -> list[int]:
        """Ids ``start .. start + n - 1``, all free, from the run that holds them."""
        first = self._starts[bisect.bisect_right(self._starts, start) - 1]
        end = self._drop_run(first)
        if first < start:
            self._add_run(first, start)
        if start + n < end:
            self._add_run(start + n, end)
        ids = list(range(start, start + n))
        self._num_free -= n
        for b in ids:
            self._count[(b - self.lo) // self.extent] -= 1
        return ids

    def _remove(self, block: int) -> int:
        return self._take_range(block, 1)[0]

    def _whole_extent(self) -> int | None:
        """The lowest wholly free extent's first id, or None."""
        while self._whole:
            x = self._whole[0]
            if self._count[x] == self._size(x):
                return self.lo + x * self.extent
            heapq.heappop(self._whole)  # taken from since it was pushed
        return None

    def take(self, after: int | None = None) -> int:
        """One free id (the caller checked there is one): ``after + 1`` when free and in the same
        extent as ``after``, else the start of a wholly free extent, else the lowest free id.
        ``after`` outside ``[lo, hi)`` (the sequence's block before is in another tier) is no
        hint."""
        if after is not None and self.lo <= after < self.hi:
            nxt = after + 1
            x = (nxt - self.lo) // self.extent
            if nxt in self and (
                (nxt - self.lo) % self.extent or self._count[x] == self._size(x)
            ):  # within after's extent, or the start of a wholly free one right after it
                return self._remove(nxt)
        start = self._whole_extent()
        return self._remove(start if start is not None else self._starts[0])

    def _aligned(self, block: int) -> int:
        """The first extent boundary at or after ``block``."""
        return self.lo + -(-(block - self.lo) // self.extent) * self.extent

    def take_run(self, need: int) -> list[int]:
        """``need`` free ids (the caller checked there are) for one sequence, in table order."""
        # the smallest run holding ``need`` (lowest on ties); in it, a sequence of a tile or
        # more starts at the run's first extent boundary where it still fits from there, so its
        # tiles are the pool's extents (at batch 16 an H100 decoded such runs 0.2-0.5 % faster
        # than the same runs 3 blocks off: bench_attention's "in order +3" control)
        best = None  # (length, misaligned, first id)
        for start in self._starts:
            end = self._end_of[start]
            if end - start < need:
                continue
            first = self._aligned(start) if need >= self.extent else start
            key = (end - start, False, first) if first + need <= end else (end - start, True, start)
            if best is None or key < best:
                best = key
        if best is not None:
            return self._take_range(best[2], need)
        out: list[int] = []
        while len(out) < need:
            out.append(self.take(out[-1] if out else None))
        return out

    def release(self, block: int) -> None:
        x = (block - self.lo) // self.extent
        start, end = block, block + 1  # joined with the runs on either side
        if block in self._start_of:
            start = self._start_of[block]
            self._drop_run(start)
        if block + 1 in self._end_of:
            end = self._drop_run(block + 1)
        self._add_run(start, end)
        self._num_free += 1
        self._count[x] += 1
        if self._count[x] == self._size(x):
            heapq.heappush(self._whole, x)
        # the heap skips stale entries lazily; rebuilt before it outgrows the pool (a service
        # frees and takes blocks for as long as it runs)
        if len(self._whole) > 2 * len(self._count) + 64:
            self._whole = [x for x in range(len(self._count)) if self._count[x] == self._size(x)]
